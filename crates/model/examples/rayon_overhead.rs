//! What one parallel operation costs to start: rayon's, called from outside its pool (the
//! program's main thread) and from inside it (a worker), and `fused::team`'s spinning helpers,
//! with gaps of one-thread work between calls as in a decoding step:
//! `cargo run --release -p kiln-model --example rayon_overhead`.
//!
//! From outside, the caller hands its tasks to the pool and sleeps until they are done: two
//! thread wake-ups a call. This is why `kiln` runs its commands on a worker of the pool
//! (crates/cli/src/main.rs). Measured on a 2-core Xeon VM: 25-30 µs of overhead a call from
//! outside, 1-2 µs from inside. From inside, rayon's idle worker still falls asleep when the gaps
//! grow (see `fused::team`); the team's helpers spin for 5 ms.

use kiln_model::fused::team;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Busy for `us` microseconds (a stand-in for arithmetic that does not sleep).
fn work(us: f64) {
    let until = Instant::now() + Duration::from_secs_f64(us * 1e-6);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

fn bench(label: &str, split: &dyn Fn()) {
    for gap in [0.0, 5.0, 20.0, 100.0] {
        let calls = 2000;
        let t = Instant::now();
        for _ in 0..calls {
            split();
            work(gap);
        }
        let per = t.elapsed().as_secs_f64() / calls as f64 * 1e6 - gap;
        println!(
            "{label}: 2 tasks of 10 µs, {gap} µs between calls: {per:.1} µs a call (10 ideal)"
        );
    }
}

fn main() {
    kiln_model::tune_allocator();
    let rayon_split = || (0..2).into_par_iter().for_each(|_| work(10.0));
    bench("rayon, from the main thread", &rayon_split);
    rayon::scope(|_| {
        bench("rayon, from a worker", &rayon_split);
        bench("team, from a worker", &|| {
            team::for_each(2, 2, &|_| work(10.0))
        });
    });
}
