//! Whether one product over concatenated weights (q|k|v, gate|up) beats separate products, at a
//! PPO minibatch's packed token count and a training step's:
//! `cargo run --release -p kiln-model --example fused_products [tokens...]`. Forward `x W`,
//! input gradient `dY Wᵀ` and weight gradient `xᵀ dY`, alternating separate and fused, medians.

use kiln_model::burn::tensor::{Distribution, Tensor};
use kiln_model::fused;
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tokens = if args.is_empty() {
        vec![850, 4096]
    } else {
        args
    };
    rayon::scope(|_| {
        for &t in &tokens {
            run(t, 256, &[256, 256, 256]);
            run(t, 256, &[688, 688]);
        }
    });
}

fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(m: usize, k: usize, ns: &[usize]) {
    let device = kiln_model::default_device();
    let dist = Distribution::Uniform(-1.0, 1.0);
    let x = Tensor::<2>::random([m, k], dist, &device);
    let ws: Vec<Tensor<2>> = ns
        .iter()
        .map(|&n| Tensor::random([k, n], dist, &device))
        .collect();
    let wf = Tensor::cat(ws.clone(), 1);
    let nf: usize = ns.iter().sum();
    let dys: Vec<Tensor<2>> = ns
        .iter()
        .map(|&n| Tensor::random([m, n], dist, &device))
        .collect();
    let dyf = Tensor::cat(dys.clone(), 1);
    // [separate, fused] x [forward, input grad, weight grad]
    let mut t = [[vec![], vec![], vec![]], [vec![], vec![], vec![]]];
    for round in 0..14 {
        for (one, tt) in [false, true].into_iter().zip(t.iter_mut()) {
            let forward = timed(|| match one {
                true => drop(fused::matmul_f32(x.clone(), wf.clone())),
                false => ws
                    .iter()
                    .for_each(|w| drop(fused::matmul_f32(x.clone(), w.clone()))),
            });
            // Separately, the branches' input gradients are summed, as the autodiff graph does.
            let input_grad = timed(|| match one {
                true => drop(fused::matmul_f32(dyf.clone(), wf.clone().transpose())),
                false => drop(
                    dys.iter()
                        .zip(&ws)
                        .map(|(dy, w)| fused::matmul_f32(dy.clone(), w.clone().transpose()))
                        .reduce(|a, b| a + b),
                ),
            });
            let weight_grad = timed(|| match one {
                true => drop(fused::matmul_f32(x.clone().transpose(), dyf.clone())),
                false => dys
                    .iter()
                    .for_each(|dy| drop(fused::matmul_f32(x.clone().transpose(), dy.clone()))),
            });
            if round >= 2 {
                for (v, s) in tt.iter_mut().zip([forward, input_grad, weight_grad]) {
                    v.push(s);
                }
            }
        }
    }
    let [sep, fus] = t.map(|r| r.map(med));
    let gf = 2.0 * (m * k * nf) as f64 / 1e9;
    println!("{m} x {k} x {ns:?}:");
    for (i, what) in ["x W", "dY Wᵀ", "xᵀ dY"].iter().enumerate() {
        println!(
            "  {what:7} separate {:6.2} ms ({:4.0} GFLOP/s)  fused {:6.2} ms ({:4.0} GFLOP/s)  {:.2}x",
            sep[i] * 1e3,
            gf / sep[i],
            fus[i] * 1e3,
            gf / fus[i],
            sep[i] / fus[i]
        );
    }
}
