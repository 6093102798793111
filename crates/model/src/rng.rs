//! A small seeded normal sampler for weight initialization: the same seed gives the same
//! weights on every backend and thread count (device RNGs differ between backends).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct Normal {
    rng: StdRng,
}

impl Normal {
    pub fn new(seed: u64) -> Self {
        Normal {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// `n` samples of N(0, std²) by the Box–Muller transform.
    pub fn sample_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = self.rng.random();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u2;
            out.push((r * theta.cos()) as f32 * std);
            out.push((r * theta.sin()) as f32 * std);
        }
        out.truncate(n);
        out
    }
}
