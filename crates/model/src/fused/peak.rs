//! The CPU's own arithmetic peak: the multiply-add instruction the products run, issued
//! back to back on register-resident values by every thread of the pool, with no memory traffic
//! at all. Every matrix product, Kiln's or PyTorch's, is bounded by it, so model FLOPs
//! utilization against it says how far from the hardware's limit a step runs, and the ratio
//! peak / PyTorch's rate bounds how much faster than PyTorch any implementation of the same
//! arithmetic can be on this machine (`kiln bench`'s `hw_peak_gflops` and `mfu_hw`).
//!
//! Written by hand: no crate measures it. Twelve independent chains per thread hide the FMA's
//! latency (4-5 cycles) on two pipes; each chain's value is checked by the caller, so the
//! compiler can neither drop nor shorten the loop, and the count of operations is tied to what
//! ran ([`Peak::check`]).

use std::time::Instant;

use super::simd;

/// Independent accumulator registers per thread.
const CHAINS: usize = 12;

/// The pause between two of [`measure`]'s runs.
const GAP: std::time::Duration = std::time::Duration::from_millis(10);

/// What one measurement ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Peak {
    /// FLOPs per second over all threads, in billions (a multiply-add is 2; a bf16 pair
    /// product `vdpbf16ps` lane is 4).
    pub gflops: f64,
    /// The instructions measured: `avx512f`, `avx2+fma`, `portable`, `avx512bf16`.
    pub isa: &'static str,
    /// FLOPs done by each thread.
    pub flops_per_thread: f64,
    /// The sum of each thread's accumulators, which the loop makes exactly half its FLOPs (the
    /// accumulators start at 0 and every multiply-add adds 1 · 1 to one of them).
    pub sums: Vec<f64>,
}

impl Peak {
    /// Whether every thread did the FLOPs counted: its accumulators sum to half of them.
    pub fn check(&self) -> bool {
        self.sums.iter().all(|&s| 2.0 * s == self.flops_per_thread)
    }
}

/// f32 multiply-adds: AVX-512 where the CPU has it, else AVX2's FMA, else a portable loop that
/// the compiler vectorizes with what the target has.
pub fn f32_peak(iters: usize, reps: usize) -> Peak {
    let (isa, chains) = f32_chains();
    measure(iters, reps, isa, chains)
}

/// bf16 pair products summed in f32 (`vdpbf16ps`, the micro-kernel of [`crate::fused::bf16`])
/// where the CPU has AVX512-BF16, else `None`. AMX tiles are not measured.
pub fn bf16_peak(iters: usize, reps: usize) -> Option<Peak> {
    if !super::bf16::native() {
        return None;
    }
    // SAFETY: the CPU has AVX512-BF16 (checked above).
    #[cfg(target_arch = "x86_64")]
    return Some(measure(iters, reps, "avx512bf16", move |n| unsafe {
        bf16_chains(n)
    }));
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Runs `chains(iters)` on every thread of rayon's pool at once, `reps` times, and keeps each
/// thread's fastest run: a peak is the best the machine does, and a shared machine only ever
/// slows it down. Each thread times its own run, so a thread that starts late (a virtual CPU the
/// host did not schedule for a while) does not halve the figure, as the wall time of the whole
/// broadcast did: a `bench/compare.py` run on a 2-core VM once measured 117 GFLOP/s against
/// 230 in the runs before and after it, and printed an MFU of 139%. The threads still run at
/// once, so two that share a core's multiply-add pipes (SMT siblings) still count as one core.
/// The runs are [`GAP`] apart, so that they span a moment in which another thread holds a core:
/// back to back, nine runs of about 7 ms at the start of `kiln run`'s first stage measured 124
/// GFLOP/s against 234 in one start of three (as if the work before still held a core).
/// `chains` returns (FLOPs done, sum of its accumulators).
fn measure(
    iters: usize,
    reps: usize,
    isa: &'static str,
    chains: impl Fn(usize) -> (f64, f64) + Sync,
) -> Peak {
    let mut best = Vec::new();
    let mut runs = Vec::new();
    for rep in 0..reps.max(1) {
        if rep > 0 {
            std::thread::sleep(GAP);
        }
        let timed = rayon::broadcast(|_| {
            let t = Instant::now();
            let run = chains(std::hint::black_box(iters));
            (run, t.elapsed().as_secs_f64())
        });
        best.resize(timed.len(), f64::INFINITY);
        for (b, (_, t)) in best.iter_mut().zip(&timed) {
            *b = b.min(*t);
        }
        runs = timed.into_iter().map(|(run, _)| run).collect();
    }
    let gflops = runs.iter().zip(&best).map(|(r, t)| r.0 / t).sum::<f64>() / 1e9;
    Peak {
        gflops,
        isa,
        flops_per_thread: runs.first().map_or(0.0, |r| r.0),
        sums: runs.iter().map(|r| r.1).collect(),
    }
}

/// The widest f32 multiply-add loop this CPU runs ([`simd::detected`], the level the row
/// primitives are chosen by) and its name: each returns (FLOPs, sum of accumulators) of `n`
/// rounds of [`CHAINS`] multiply-adds per lane.
fn f32_chains() -> (&'static str, Chains) {
    #[cfg(target_arch = "x86_64")]
    match simd::detected() {
        // SAFETY (both): the CPU has the features the loop is compiled for.
        simd::Level::V4 => return ("avx512f", |n| unsafe { f32_chains_avx512(n) }),
        simd::Level::V3 => return ("avx2+fma", |n| unsafe { f32_chains_avx2(n) }),
        simd::Level::Baseline => {}
    }
    ("portable", f32_chains_portable)
}

/// `n` rounds of multiply-adds on every accumulator: (FLOPs, sum of the accumulators).
type Chains = fn(usize) -> (f64, f64);

/// The sum of every accumulator's lanes, in f64.
fn total(lanes: &[f32]) -> f64 {
    lanes.iter().map(|&x| x as f64).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f32_chains_avx512(n: usize) -> (f64, f64) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(std::hint::black_box(1.0));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..n {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(one, one, *a);
        }
    }
    let lanes: [[f32; 16]; CHAINS] = std::mem::transmute(acc);
    (2.0 * (n * CHAINS * 16) as f64, total(lanes.as_flattened()))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_chains_avx2(n: usize) -> (f64, f64) {
    use std::arch::x86_64::*;
    let one = _mm256_set1_ps(std::hint::black_box(1.0));
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for _ in 0..n {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(one, one, *a);
        }
    }
    let lanes: [[f32; 8]; CHAINS] = std::mem::transmute(acc);
    (2.0 * (n * CHAINS * 8) as f64, total(lanes.as_flattened()))
}

/// 4 lanes per chain, in plain code: NEON's FMA on aarch64, elsewhere a multiply and an add
/// (`mul_add` is a libm call on x86-64 without FMA). Each accumulator is `x · 1 + 1`, so that
/// nothing is loop-invariant.
fn f32_chains_portable(n: usize) -> (f64, f64) {
    let one = std::hint::black_box(1.0f32);
    let mut acc = [[0f32; 4]; CHAINS];
    for _ in 0..n {
        for a in acc.iter_mut() {
            for x in a.iter_mut() {
                #[cfg(target_arch = "aarch64")]
                {
                    *x = x.mul_add(one, one);
                }
                #[cfg(not(target_arch = "aarch64"))]
                {
                    *x = *x * one + one;
                }
            }
        }
    }
    (2.0 * (n * CHAINS * 4) as f64, total(acc.as_flattened()))
}

/// (FLOPs, sum of accumulators) of `n` rounds of [`CHAINS`] `vdpbf16ps`: each f32 lane adds
/// two bf16 products, 1 · 1 + 1 · 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_chains(n: usize) -> (f64, f64) {
    use std::arch::x86_64::*;
    // bf16 1.0 is 0x3f80, in both halves of each 32-bit lane.
    let one: __m512bh = std::mem::transmute(_mm512_set1_epi16(std::hint::black_box(0x3f80)));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..n {
        for a in acc.iter_mut() {
            *a = _mm512_dpbf16_ps(*a, one, one);
        }
    }
    let lanes: [[f32; 16]; CHAINS] = std::mem::transmute(acc);
    // Per lane and instruction: 2 products and 2 additions.
    (4.0 * (n * CHAINS * 16) as f64, total(lanes.as_flattened()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_does_the_flops_it_counts() {
        // 1,000 rounds: each accumulator reaches 1,000 (f32 holds it exactly).
        let p = f32_peak(1000, 2);
        assert!(p.check(), "{p:?}");
        assert_eq!(p.sums.len(), rayon::current_num_threads());
        assert!(p.gflops.is_finite() && p.gflops > 0.0, "{p:?}");
        if let Some(p) = bf16_peak(1000, 2) {
            assert!(p.check(), "{p:?}");
        }
    }

    #[test]
    fn each_variant_counts_what_it_runs() {
        // The portable loop everywhere, and the vector ones the CPU has: 2 FLOPs per
        // multiply-add, every accumulator at n.
        let n = 777;
        let check = |(flops, sum): (f64, f64)| assert_eq!(2.0 * sum, flops);
        check(f32_chains_portable(n));
        assert_eq!(f32_chains_portable(n).0, 2.0 * (n * CHAINS * 4) as f64);
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let level = simd::detected();
            if level == simd::Level::V4 {
                check(f32_chains_avx512(n));
            }
            if matches!(level, simd::Level::V3 | simd::Level::V4) {
                check(f32_chains_avx2(n));
            }
            if super::super::bf16::native() {
                check(bf16_chains(n));
            }
        }
    }
}
