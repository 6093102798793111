//! The few-rows product (`fused::skinny`) on weights that come from memory, as in decoding a
//! model larger than L3: 48 different weights of one layer shape used in turn, each read in
//! place and from its packed copy (`skinny::pack`), alternating, medians of 20 rounds:
//! `cargo run --release -p kiln-model --example skinny_dram`.

use kiln_model::fused::skinny;
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    if !skinny::available() {
        eprintln!("this CPU has no copy of the few-rows kernel (it needs AVX2 + FMA)");
        return;
    }
    // The `small` preset's layer shapes at batch 16.
    for (m, k, n) in [(16, 512, 1376), (16, 1376, 512), (16, 512, 8192)] {
        let a = vec![0.5f32; m * k];
        let weights: Vec<Vec<f32>> = (0..48).map(|i| vec![0.25 + i as f32; k * n]).collect();
        // SAFETY: every weight is a row-major k x n matrix; `a` is m x k.
        let packed: Vec<skinny::Packed> = weights
            .iter()
            .map(|w| unsafe { skinny::pack(k, n, w.as_ptr(), n) })
            .collect();
        let (mut in_place, mut from_packed) = (vec![], vec![]);
        for _ in 0..20 {
            let t = Instant::now();
            for w in &weights {
                let _ = unsafe { skinny::matmul(m, k, n, a.as_ptr(), k, w.as_ptr(), n) };
            }
            in_place.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for p in &packed {
                let _ = unsafe { skinny::matmul_packed(m, a.as_ptr(), k, p) };
            }
            from_packed.push(t.elapsed().as_secs_f64());
        }
        in_place.sort_by(f64::total_cmp);
        from_packed.sort_by(f64::total_cmp);
        let flops = 2.0 * (m * k * n * weights.len()) as f64;
        let (s, p) = (in_place[10], from_packed[10]);
        println!(
            "({m},{k},{n}) in place {:.1} GFLOP/s | packed {:.1} GFLOP/s | {:.2}x",
            flops / s / 1e9,
            flops / p / 1e9,
            s / p
        );
    }
}
