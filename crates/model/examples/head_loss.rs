//! The language-model head and its mean cross-entropy, forward and backward, at `tiny`'s hidden
//! size over a vocabulary (argument, default 32000) for 2,048 rows (half a `tiny` step): the
//! whole `(N, V)` logits (`head` then `token_logprobs`) against the chunked pass
//! (`fused::head_logprob_sum`), alternating, medians of 9:
//! `cargo run --release -p kiln-model --example head_loss -- 32000 [rows]` (`PAIR=1`: two such
//! passes side by side on separate graphs, as the trainer's two halves). The allocator keeps
//! freed memory as `kiln` sets it at start-up; with glibc's defaults every fresh `(N, V)` buffer
//! is faulted in page by page, which cost the whole logits a third of their time here.
use burn::tensor::{Int, Tensor, TensorData};
use kiln_model::{default_device, fused, to_vec};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    rayon::scope(|_| run());
}

fn run() {
    let vocab: usize = std::env::args()
        .nth(1)
        .map_or(32000, |v| v.parse().unwrap());
    let rows: usize = std::env::args().nth(2).map_or(2048, |v| v.parse().unwrap());
    let (n, d) = (rows, 256);
    let device = default_device().autodiff();
    let h0: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let w0: Vec<f32> = (0..d * vocab)
        .map(|i| ((i * 104729) % 2001) as f32 / 20000.0 - 0.05)
        .collect();
    let ids: Vec<i64> = (0..n).map(|i| ((i * 31) % vocab) as i64).collect();
    let h = Tensor::<2>::from_data(TensorData::new(h0, [n, d]), &device).require_grad();
    let w = Tensor::<2>::from_data(TensorData::new(w0, [d, vocab]), &device).require_grad();
    let t = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device);
    let (mut tw, mut tf) = (vec![], vec![]);
    let pair = std::env::var("PAIR").is_ok();
    let whole = |h: Tensor<2>, w: Tensor<2>| {
        let lp = fused::token_logprobs(fused::matmul(h.clone(), w.clone()), t.clone());
        let loss = lp.neg().sum() / n as f64;
        let g = loss.backward();
        let _ = (
            to_vec(h.grad(&g).unwrap()).len(),
            to_vec(w.grad(&g).unwrap()).len(),
        );
    };
    let chunked = |h: Tensor<2>, w: Tensor<2>| {
        let coef = Tensor::full([n], -1.0 / n as f64, &h.device());
        let loss = fused::head_logprob_sum(h.clone(), w.clone(), t.clone(), coef, true);
        let g = loss.backward();
        let _ = (
            to_vec(h.grad(&g).unwrap()).len(),
            to_vec(w.grad(&g).unwrap()).len(),
        );
    };
    // With PAIR, two such passes side by side (separate graphs), as the trainer's two halves.
    let h2 = Tensor::<2>::from_data(h.to_data(), &device).require_grad();
    let w2 = Tensor::<2>::from_data(w.to_data(), &device).require_grad();
    for _ in 0..9 {
        for (f, times) in [
            (&whole as &(dyn Fn(Tensor<2>, Tensor<2>) + Sync), &mut tw),
            (&chunked, &mut tf),
        ] {
            let s = Instant::now();
            if pair {
                rayon::join(|| f(h.clone(), w.clone()), || f(h2.clone(), w2.clone()));
            } else {
                f(h.clone(), w.clone());
            }
            times.push(s.elapsed().as_secs_f64());
        }
    }
    let flops = if pair { 2.0 } else { 1.0 } * 6.0 * (n * d * vocab) as f64;
    tw.sort_by(f64::total_cmp);
    tf.sort_by(f64::total_cmp);
    println!(
        "{n} rows, d {d}, vocab {vocab}: whole logits {:.1} ms ({:.0} GFLOP/s) | chunked {:.1} ms ({:.0} GFLOP/s) | {:.2}x",
        tw[4] * 1e3,
        flops / tw[4] / 1e9,
        tf[4] * 1e3,
        flops / tf[4] / 1e9,
        tw[4] / tf[4]
    );
}
