//! How a PPO minibatch's products (about 830 packed tokens) and a `tiny` training step's (4096)
//! scale from one thread to two, f32, alternating, medians of 15:
//! `cargo run --release -p kiln-model --example thread_scaling`.

use kiln_model::burn::tensor::{Distribution, Tensor};
use kiln_model::{default_device, fused};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    let device = default_device();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let two = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for t in [830usize, 4096] {
        let shapes = [
            (t, 256, 256, false),
            (t, 256, 688, false),
            (t, 688, 256, false),
            (256, t, 688, true),
            (688, t, 256, true),
            (256, t, 256, true),
        ];
        for (m, k, n, transposed) in shapes {
            let dist = Distribution::Uniform(-1.0, 1.0);
            let a = if transposed {
                Tensor::<2>::random([k, m], dist, &device).transpose()
            } else {
                Tensor::<2>::random([m, k], dist, &device)
            };
            let b = Tensor::<2>::random([k, n], dist, &device);
            let mut times = [vec![], vec![]];
            for round in 0..17 {
                for (i, pool) in [&one, &two].iter().enumerate() {
                    let (a, b) = (a.clone(), b.clone());
                    let dt = pool.install(|| {
                        let start = Instant::now();
                        drop(fused::matmul_f32(a, b));
                        start.elapsed().as_secs_f64()
                    });
                    if round >= 2 {
                        times[i].push(dt);
                    }
                }
            }
            let flops = 2.0 * (m * k * n) as f64;
            let [g1, g2] = times.map(|mut v| {
                v.sort_by(f64::total_cmp);
                flops / v[v.len() / 2] / 1e9
            });
            let what = if transposed { " (A = xᵀ)" } else { "" };
            println!(
                "{m} x {k} x {n}{what}: 1 thread {g1:.0}, 2 threads {g2:.0} GFLOP/s ({:.2}x)",
                g2 / g1
            );
        }
    }
}
