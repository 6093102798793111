//! Streaming `small`'s 118 MB of f32 weights in as many pieces as a batch-1 decoding step has
//! products (57), each piece split in two halves for two threads: by rayon's `join` and by
//! `fused::team::for_each`, alternating, from inside rayon's pool as `kiln` runs (medians of 30):
//! `cargo run --release -p kiln-model --example stream_pieces`. With `--gap US`, each piece is
//! followed by that much one-thread work, as a decoding step's norms and attention follow its
//! products.

use kiln_model::fused::team;
use std::time::{Duration, Instant};

/// The sum of `h`, in 64 independent lanes (bound by memory, not by the adds' latency).
fn sum(h: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { sum_v4(h) };
    }
    sum_lanes(h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_v4(h: &[f32]) -> f32 {
    sum_lanes(h)
}

#[inline(always)]
fn sum_lanes(h: &[f32]) -> f32 {
    let mut lanes = [0f32; 64];
    for c in h.chunks_exact(64) {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum()
}

/// Busy for `us` microseconds.
fn work(us: f64) {
    let until = Instant::now() + Duration::from_secs_f64(us * 1e-6);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

fn main() {
    kiln_model::tune_allocator();
    let gap: f64 = match std::env::args().skip_while(|a| a != "--gap").nth(1) {
        Some(g) => g.parse().expect("--gap takes microseconds"),
        None => 0.0,
    };
    let n: usize = 118_000_000 / 4;
    let weights: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let pieces: usize = 57;
    let per = n.div_ceil(pieces);
    let rayon_step = || {
        let mut s = 0.0;
        for c in weights.chunks(per) {
            let (x, y) = c.split_at(c.len() / 2);
            let (a, b) = rayon::join(|| sum(x), || sum(y));
            s += a + b;
            work(gap);
        }
        s
    };
    let team_step = || {
        let mut s = 0.0;
        for c in weights.chunks(per) {
            let halves = c.split_at(c.len() / 2);
            let sums = [std::sync::Mutex::new(0.0), std::sync::Mutex::new(0.0)];
            team::for_each(2, 2, &|i| {
                *sums[i].lock().unwrap() = sum(if i == 0 { halves.0 } else { halves.1 });
            });
            s += sums.iter().map(|m| *m.lock().unwrap()).sum::<f32>();
            work(gap);
        }
        s
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let time = |f: &dyn Fn() -> f32| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        };
        let (mut tr, mut tt) = (vec![], vec![]);
        for _ in 0..30 {
            tr.push(time(&rayon_step));
            tt.push(time(&team_step));
        }
        for (what, t) in [("rayon::join", &mut tr), ("team::for_each", &mut tt)] {
            t.sort_by(f64::total_cmp);
            let t = t[t.len() / 2] - pieces as f64 * gap * 1e-6;
            println!(
                "{what}: {:.2} ms a step less the gaps, {:.1} GB/s",
                t * 1e3,
                (n * 4) as f64 / t / 1e9
            );
        }
    });
}
