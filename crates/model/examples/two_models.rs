//! A PPO minibatch's two models (policy and critic, `tiny` shape, 16 rows of 52 tokens) trained
//! one after the other and side by side on rayon's two threads (`rayon::join`), forward and
//! backward, alternating, medians of 9: `cargo run --release -p kiln-model --example two_models`.

use kiln_model::burn::tensor::{Tensor, TensorData};
use kiln_model::{default_device, ForwardInput, Llama, LlamaConfig};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    let device = default_device().autodiff();
    let cfg = LlamaConfig::new(4096, 256, 688, 4, 4, 4, 256);
    let policy = Llama::init(&cfg, 1, &device).unwrap();
    let critic = Llama::init(&cfg, 2, &device).unwrap();
    let rows: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            (0..52)
                .map(|t| ((i * 131 + t * 17) % 4096) as u32)
                .collect()
        })
        .collect();
    let input = ForwardInput::causal(&rows, &device);
    // The policy's loss reads its logits at the last 32 positions; the critic's, its hidden
    // states (a value head's input).
    let at: Vec<usize> = (0..16)
        .flat_map(|i| (20..52).map(move |t| i * 52 + t))
        .collect();
    let step = |m: &Llama, logits: bool| {
        let h = m.hidden_at(&input, &at);
        let loss = if logits {
            let n = at.len();
            m.head(h.reshape([1, n, 256])).mean()
        } else {
            h.mean()
        };
        let g = loss.backward();
        drop(g);
    };
    let mut times = [vec![], vec![]];
    for round in 0..11 {
        for (i, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            if i == 0 {
                step(&policy, true);
                step(&critic, false);
            } else {
                rayon::join(|| step(&policy, true), || step(&critic, false));
            }
            if round >= 2 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    let [seq, par] = times.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    });
    println!(
        "one after the other {seq:.1} ms, side by side {par:.1} ms ({:.2}x)",
        seq / par
    );
    let _ = Tensor::<1>::from_data(TensorData::new(vec![0f32], [1]), &default_device());
}
