//! f32 products at the shapes of `tiny`'s training step and PPO minibatch and of `small`'s
//! step, `gemm` and `fused::sgemm` alternating in one process, outputs allocated once: medians
//! of 9 rounds, the ratio, and each side's fastest round (on a shared machine the medians move
//! with the neighbours' load; the fastest round is what a product reaches when it has the
//! cores). `cargo run --release -p kiln-model --example sgemm_shapes` (AVX-512 CPUs only).

fn main() {
    kiln_model::tune_allocator();
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("fused::sgemm is x86-64 (AVX-512) only");
}

#[cfg(target_arch = "x86_64")]
#[path = "support/shapes.rs"]
mod shapes;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::shapes::{data, view, SHAPES};
    use kiln_model::fused::kernels;
    use std::time::Instant;

    pub fn main() {
        if !kiln_model::fused::sgemm::supported() {
            eprintln!("fused::sgemm needs AVX-512");
            return;
        }
        // On a worker of rayon's pool, as `kiln` runs.
        rayon::scope(|_| shapes());
    }

    fn shapes() {
        println!(
            "{:<18} {:>16} {:>8} {:>8} {:>7} {:>10} {:>10}",
            "product", "m x k x n", "gemm", "sgemm", "ratio", "gemm best", "sgemm best"
        );
        for (what, m, k, n, at, bt) in SHAPES {
            let a = data(m * k, 1);
            let b = data(k * n, 2);
            let (am, bm) = (view(&a, m, k, at), view(&b, k, n, bt));
            let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
            let (mut t1, mut t2) = (vec![], vec![]);
            for _ in 0..9 {
                let t = Instant::now();
                // SAFETY: the views and outputs have these shapes.
                unsafe {
                    let par = gemm::Parallelism::Rayon(0);
                    kernels::gemm_into(m, n, k, c1.as_mut_ptr(), n as isize, am, bm, par)
                };
                t1.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                unsafe {
                    kiln_model::fused::sgemm::gemm(m, n, k, c2.as_mut_ptr(), n as isize, am, bm)
                };
                t2.push(t.elapsed().as_secs_f64());
            }
            let err = c1
                .iter()
                .zip(&c2)
                .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{what}: sgemm differs from gemm by {err}");
            // GFLOP/s of the median and of the fastest round.
            let gflops = |mut t: Vec<f64>| {
                t.sort_by(f64::total_cmp);
                let rate = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
                (rate(t[t.len() / 2]), rate(t[0]))
            };
            let ((g1, b1), (g2, b2)) = (gflops(t1), gflops(t2));
            let shape = format!("{m}x{k}x{n}");
            println!(
                "{what:<18} {shape:>16} {g1:>8.0} {g2:>8.0} {:>6.2}x {b1:>10.0} {b2:>10.0}",
                g2 / g1
            );
        }
    }
}
