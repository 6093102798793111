//! bf16 products (`fused::bf16::gemm`) beside f32's (`fused::sgemm`) at the shapes of `tiny`'s
//! training step, a PPO minibatch and rollout and `small`'s step (`support/shapes.rs`), alternating in one process, on rayon's
//! pool, then on one thread: each side's fastest of 9 rounds in GFLOP/s (on a shared machine the
//! fastest round is what a product reaches when it has the cores; bf16's peak is twice f32's).
//! `cargo run --release -p kiln-model --example bf16_shapes` (AVX512-BF16 CPUs only); an
//! argument keeps the products whose name contains it.

fn main() {
    kiln_model::tune_allocator();
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("fused::bf16's native kernel is x86-64 only");
}

#[cfg(target_arch = "x86_64")]
#[path = "support/shapes.rs"]
mod shapes;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::shapes::{data, view, SHAPES};
    use kiln_model::fused::bf16::{self, Kernel};
    use std::time::Instant;

    pub fn main() {
        if !bf16::native() || !kiln_model::fused::sgemm::supported() {
            eprintln!("needs AVX-512 and AVX512-BF16");
            return;
        }
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        println!(
            "{:<20} {:>16} {:>9} {:>9} {:>9} {:>9}",
            "product", "m x k x n", "f32", "bf16", "f32 1t", "bf16 1t"
        );
        let only = std::env::args().nth(1).unwrap_or_default();
        for (what, m, k, n, at, bt) in SHAPES.into_iter().filter(|s| s.0.contains(&only)) {
            let a = data(m * k, 1);
            let b = data(k * n, 2);
            let (am, bm) = (view(&a, m, k, at), view(&b, k, n, bt));
            let mut c = vec![0f32; m * n];
            let mut run = |bf: bool| {
                let t = Instant::now();
                // SAFETY: the views and the output have these shapes.
                unsafe {
                    if bf {
                        bf16::gemm(
                            m,
                            n,
                            k,
                            c.as_mut_ptr(),
                            n as isize,
                            false,
                            am,
                            bm,
                            Kernel::Best,
                        )
                    } else {
                        kiln_model::fused::sgemm::gemm(m, n, k, c.as_mut_ptr(), n as isize, am, bm)
                    }
                }
                t.elapsed().as_secs_f64()
            };
            let mut best = [f64::MAX; 4];
            // The pools one after the other: a pool's workers spin a while after their last
            // task, and would take a core from the other's first rounds.
            rayon::scope(|_| {
                for _ in 0..9 {
                    best[0] = best[0].min(run(false));
                    best[1] = best[1].min(run(true));
                }
            });
            one.install(|| {
                for _ in 0..9 {
                    best[2] = best[2].min(run(false));
                    best[3] = best[3].min(run(true));
                }
            });
            let g = best.map(|s| 2.0 * (m * k * n) as f64 / s / 1e9);
            let shape = format!("{m}x{k}x{n}");
            println!(
                "{what:<20} {shape:>16} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
                g[0], g[1], g[2], g[3]
            );
        }
    }
}
