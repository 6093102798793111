//! A `tiny` training step's matrix products (4096 tokens) at f32 and bf16, one after the other in
//! each round, medians of 10 rounds: `cargo run --release -p kiln-model --example matmul_shapes`.
//! `KILN_AMX=0` runs bf16 on `vdpbf16ps` where the CPU has AMX.

use kiln_model::burn::tensor::{Distribution, Tensor};
use kiln_model::{default_device, fused};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    println!(
        "bf16 kernel: {}",
        if fused::bf16::amx() {
            "AMX"
        } else if fused::bf16::native() {
            "AVX512-BF16"
        } else {
            "portable"
        }
    );
    // On a worker of rayon's pool, as `kiln` runs (see examples/rayon_overhead.rs).
    rayon::scope(|_| shapes());
}

fn shapes() {
    let device = default_device();
    let t = 4096usize;
    // (m, k, n, A stored transposed): forward products, the head, and weight gradients `xᵀ dy`.
    let shapes = [
        (t, 256, 256, false),
        (t, 256, 688, false),
        (t, 688, 256, false),
        (t, 256, 4096, false),
        (256, t, 688, true),
        (688, t, 256, true),
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
        for round in 0..12 {
            for (bf16, t) in times.iter_mut().enumerate() {
                let start = Instant::now();
                let c = if bf16 == 0 {
                    fused::matmul_f32(a.clone(), b.clone())
                } else {
                    fused::matmul_bf16(a.clone(), b.clone())
                };
                drop(c);
                if round >= 2 {
                    t.push(start.elapsed().as_secs_f64());
                }
            }
        }
        let flops = 2.0 * (m * k * n) as f64;
        let [f32s, bf16s] = times.map(|mut v| {
            v.sort_by(f64::total_cmp);
            flops / v[v.len() / 2] / 1e9
        });
        let what = if transposed { " (A = xᵀ)" } else { "" };
        println!("{m} x {k} x {n}{what}: f32 {f32s:.0} GFLOP/s, bf16 {bf16s:.0} GFLOP/s");
    }
}
