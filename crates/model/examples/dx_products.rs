//! The backward pass's input-gradient products `dy · wᵀ` with `wᵀ` a transposed view of the
//! weight (what autodiff hands over) and with `wᵀ` contiguous, side by side, medians of 15:
//! `cargo run --release -p kiln-model --example dx_products`.
use kiln_model::burn::tensor::{Distribution, Tensor};
use kiln_model::{default_device, fused};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    rayon::scope(|_| shapes());
}

fn shapes() {
    let device = default_device();
    for t in [832usize, 4096] {
        for (d, n) in [
            (256usize, 256usize),
            (256, 688),
            (688, 256),
            (256, 768),
            (256, 4096),
        ] {
            let dist = Distribution::Uniform(-1.0, 1.0);
            let dy = Tensor::<2>::random([t, n], dist, &device);
            let w = Tensor::<2>::random([d, n], dist, &device);
            let wt = Tensor::<2>::from_data(w.clone().transpose().into_data(), &device);
            let mut times = [vec![], vec![]];
            for round in 0..17 {
                for (i, tm) in times.iter_mut().enumerate() {
                    let start = Instant::now();
                    let c = if i == 0 {
                        fused::matmul_f32(dy.clone(), w.clone().transpose())
                    } else {
                        fused::matmul_f32(dy.clone(), wt.clone())
                    };
                    drop(c);
                    if round >= 2 {
                        tm.push(start.elapsed().as_secs_f64());
                    }
                }
            }
            let flops = 2.0 * (t * d * n) as f64;
            let [view, contig] = times.map(|mut v| {
                v.sort_by(f64::total_cmp);
                flops / v[v.len() / 2] / 1e9
            });
            println!(
                "{t} x {n} x {d}: wᵀ view {view:.0} GFLOP/s, wᵀ contiguous {contig:.0} GFLOP/s"
            );
        }
    }
}
