//! Fused attention's forward and backward pass at a `tiny` training step's shape (16 rows of 256
//! tokens, causal) and at a PPO minibatch's (rows of two packed segments), with its products run
//! tile by tile over the keys each row may see and dense over every key (`KILN_ATTN_TILES=0`),
//! alternating, medians of 10 rounds:
//! `cargo run --release -p kiln-model --example attention_tiles`.

use kiln_model::burn::tensor::{Distribution, Tensor, TensorData};
use kiln_model::fused::kernels::set_tiles_enabled;
use kiln_model::llama::MASKED;
use kiln_model::{default_device, fused};
use std::time::Instant;

/// An additive mask `(B, 1, T, T)` whose rows hold causal segments of the given lengths.
fn segments(b: usize, t: usize, lens: &[usize]) -> Vec<f32> {
    let mut m = vec![MASKED; b * t * t];
    for row in 0..b {
        let mut start = 0;
        for &len in lens {
            for i in start..start + len {
                for j in start..=i {
                    m[(row * t + i) * t + j] = 0.0;
                }
            }
            start += len;
        }
        // slots past the last segment see only themselves
        for i in start..t {
            m[(row * t + i) * t + i] = 0.0;
        }
    }
    m
}

fn main() {
    kiln_model::tune_allocator();
    // On a worker of rayon's pool, as `kiln` runs (see examples/rayon_overhead.rs).
    rayon::scope(|_| cases());
}

fn cases() {
    let device = default_device().autodiff();
    let (h, hd) = (4, 64);
    for (name, b, t, lens) in [
        ("tiny training, causal", 16, 256, vec![256]),
        ("PPO minibatch, 2 segments", 8, 106, vec![53, 52]),
        ("PPO minibatch, 1 segment", 16, 61, vec![61]),
    ] {
        let dist = Distribution::Uniform(-1.0, 1.0);
        let q = Tensor::<4>::random([b, h, t, hd], dist, &device).require_grad();
        let k = Tensor::<4>::random([b, h, t, hd], dist, &device).require_grad();
        let v = Tensor::<4>::random([b, h, t, hd], dist, &device).require_grad();
        let mask = Tensor::<4>::from_data(
            TensorData::new(segments(b, t, &lens), [b, 1, t, t]),
            &device,
        );
        let (qi, ki, vi, mi) = (
            q.clone().inner(),
            k.clone().inner(),
            v.clone().inner(),
            mask.clone().inner(),
        );
        // [tiled, dense] x [forward alone, forward + backward]
        let mut times = [[vec![], vec![]], [vec![], vec![]]];
        for round in 0..12 {
            for (dense, times) in times.iter_mut().enumerate() {
                set_tiles_enabled(dense == 0);
                let start = Instant::now();
                drop(fused::attention(
                    qi.clone(),
                    ki.clone(),
                    vi.clone(),
                    mi.clone(),
                    0.125,
                ));
                let forward = start.elapsed().as_secs_f64() * 1e3;
                let start = Instant::now();
                let out = fused::attention(q.clone(), k.clone(), v.clone(), mask.clone(), 0.125);
                drop(out.sum().backward());
                if round >= 2 {
                    times[0].push(forward);
                    times[1].push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let [[tf, tb], [df, db]] = times.map(|pair| {
            pair.map(|mut v| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            })
        });
        println!(
            "{name} ({b} x {t}): forward tiled {tf:.2} ms, dense {df:.2} ms ({:.2}x); \
             forward + backward tiled {tb:.2} ms, dense {db:.2} ms ({:.2}x)",
            df / tf,
            db / tb
        );
    }
}
