//! The attention kernels' products at a `tiny` training step's shapes, one thread, `small::gemm`
//! (no packing, AVX-512) against the `gemm` crate, alternating, medians of 200:
//! `cargo run --release -p kiln-model --example small_products`.

use kiln_model::fused::small;
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    let s = 256usize;
    // (name, m, n, k, a_rs, a_cs, b_rs): B rows contiguous; A's layout as the kernels read it.
    let cases = [
        (
            "scores, 32-row tile x 128 keys",
            32,
            128,
            64,
            256isize,
            1isize,
            s as isize,
        ),
        ("p v, 32 rows x 128 keys", 32, 64, 128, s as isize, 1, 256),
        (
            "dk += dsᵀ q, 64 keys x 192 rows",
            64,
            64,
            192,
            1,
            s as isize,
            256,
        ),
        ("dense scores 256 x 256", 256, 256, 64, 256, 1, s as isize),
        ("dense p v 256 x 256", 256, 64, 256, s as isize, 1, 256),
    ];
    let a: Vec<f32> = (0..256 * 256 * 2)
        .map(|i| (i % 97) as f32 / 97.0 - 0.5)
        .collect();
    let b: Vec<f32> = (0..256 * 256 * 2)
        .map(|i| (i % 89) as f32 / 89.0 - 0.5)
        .collect();
    let mut c = vec![0f32; 256 * 256];
    for (name, m, n, k, a_rs, a_cs, b_rs) in cases {
        let mut times = [vec![], vec![]];
        for round in 0..220 {
            for (which, t) in times.iter_mut().enumerate() {
                let start = Instant::now();
                unsafe {
                    let f = if which == 0 {
                        small::gemm
                    } else {
                        small::gemm_crate
                    };
                    f(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        n as isize,
                        false,
                        a.as_ptr(),
                        a_rs,
                        a_cs,
                        b.as_ptr(),
                        b_rs,
                        1,
                        1.0,
                    );
                }
                if round >= 20 {
                    t.push(start.elapsed().as_secs_f64());
                }
            }
        }
        let flops = 2.0 * (m * n * k) as f64;
        let [ours, crate_] = times.map(|mut v| {
            v.sort_by(f64::total_cmp);
            flops / v[v.len() / 2] / 1e9
        });
        println!("{name}: small {ours:.0} GFLOP/s, gemm crate {crate_:.0} GFLOP/s");
    }
}
