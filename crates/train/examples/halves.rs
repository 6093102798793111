//! A training step's forward and backward pass (fused log-probabilities, the mean over every
//! token) on a whole batch, and on its two halves side by side on rayon's two threads: both on
//! the same model (their graphs share the parameters' nodes, which burn merges under one lock),
//! and the second on a `trainer::twin` (what `trainer::backward_pair` does). Alternating, medians
//! of 7: `cargo run --release -p kiln-train --example halves [tiny|small]`.

use kiln_model::burn::optim::{GradientsAccumulator, GradientsParams};
use kiln_model::{default_device, Llama, LlamaConfig};
use kiln_train::stages::pretrain::lm_loss;
use kiln_train::trainer::twin;
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    // On a worker of rayon's pool, as `kiln` runs.
    rayon::scope(|_| run());
}

fn run() {
    let small = std::env::args().nth(1).as_deref() == Some("small");
    let (cfg, b, t) = if small {
        (LlamaConfig::new(8192, 512, 1376, 8, 8, 8, 512), 8, 512)
    } else {
        (LlamaConfig::new(4096, 256, 688, 4, 4, 4, 256), 16, 256)
    };
    let model = Llama::init(&cfg, 1, &default_device().autodiff()).unwrap();
    let v = cfg.vocab_size;
    let windows: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..=t)
                .map(|j| ((i * 7919 + j * 104729) % v) as u32)
                .collect()
        })
        .collect();
    let (x, y) = windows.split_at(b / 2);
    let grads = |m: &Llama, w: &[Vec<u32>], weight: f64| {
        GradientsParams::from_grads((lm_loss(m, w) * weight).backward(), m)
    };
    let sum = |a: GradientsParams, b: GradientsParams| {
        let mut acc = GradientsAccumulator::new();
        acc.accumulate(&model, a);
        acc.accumulate(&model, b);
        acc.grads()
    };
    let mut times = [vec![], vec![], vec![]];
    for round in 0..9 {
        for (i, times) in times.iter_mut().enumerate() {
            let start = Instant::now();
            let g = match i {
                0 => grads(&model, &windows, 1.0),
                1 => {
                    let (a, b) = rayon::join(|| grads(&model, x, 0.5), || grads(&model, y, 0.5));
                    sum(a, b)
                }
                _ => {
                    let other = twin(&model);
                    let (a, b) = rayon::join(|| grads(&model, x, 0.5), || grads(&other, y, 0.5));
                    sum(a, b)
                }
            };
            drop(g);
            if round >= 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
    }
    let [one, shared, twin] = times.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    });
    println!(
        "{b} x {t}: one batch {one:.1} ms; halves on one model {shared:.1} ms ({:.2}x); halves on the model and a twin {twin:.1} ms ({:.2}x)",
        one / shared,
        one / twin
    );
}
