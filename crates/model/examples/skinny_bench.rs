//! The few-rows product (`fused::skinny`, what decoding steps of up to 64 rows use) against burn's
//! matmul on the layer shapes of the tiny and small presets, alternating, medians of 400:
//! `cargo run --release -p kiln-model --example skinny_bench`. Alone, threads sleep between calls
//! and waking them is part of each figure; inside a decoding loop they are awake (see
//! docs/performance.md for the end-to-end figures that chose `skinny::ROWS`).

use burn::tensor::{Tensor, TensorData};
use kiln_model::{default_device, fused};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    let device = default_device();
    for (m, k, n) in [
        (1, 256, 768),
        (1, 256, 4096),
        (4, 256, 688),
        (16, 256, 256),
        (16, 256, 688),
        (16, 688, 256),
        (16, 256, 4096),
        (32, 256, 688),
        (16, 512, 1376),
    ] {
        let a = Tensor::<2>::from_data(TensorData::new(vec![0.5f32; m * k], [m, k]), &device);
        let b = Tensor::<2>::from_data(TensorData::new(vec![0.25f32; k * n], [k, n]), &device);
        let (mut ts, mut tb) = (vec![], vec![]);
        for _ in 0..400 {
            let t = Instant::now();
            let _ = fused::matmul_rows(a.clone(), b.clone()).into_data();
            ts.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let _ = a.clone().matmul(b.clone()).into_data();
            tb.push(t.elapsed().as_secs_f64());
        }
        ts.sort_by(f64::total_cmp);
        tb.sort_by(f64::total_cmp);
        let (s, g) = (ts[200], tb[200]);
        let fl = 2.0 * (m * k * n) as f64;
        println!(
            "({m},{k},{n}) skinny {:.1} us {:.1} GF/s | gemm {:.1} us {:.1} GF/s | {:.2}x",
            s * 1e6,
            fl / s / 1e9,
            g * 1e6,
            fl / g / 1e9,
            g / s
        );
    }
}
