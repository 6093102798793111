//! Times `generate` at the shapes of a PPO rollout in TRL's benchmark (64 prompts of 12-29
//! tokens, 32 new tokens, the `tiny` model): `cargo run --release -p kiln-engine --example rollout`.
use kiln_engine::{generate, SamplingParams};
use kiln_model::{Llama, LlamaConfig};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    // On a thread of rayon's pool, as `kiln` runs its commands.
    rayon::scope(|_| run());
}

fn run() {
    let device = kiln_model::default_device();
    let config = LlamaConfig::new(4096, 256, 688, 4, 4, 4, 256);
    let model = Llama::init(&config, 0, &device).expect("a model");
    let mut rng = StdRng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|_| {
            let n = rng.random_range(12..30);
            (0..n).map(|_| rng.random_range(0..4096_u32)).collect()
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: 32,
        ..Default::default()
    };
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut times = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        generate(&model, &prompts, &params, |_, _| {}).expect("generation");
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let all: Vec<String> = times.iter().map(|t| format!("{:.0}", t * 1e3)).collect();
    println!(
        "rollout 64 x 32: median {:.1} ms (each, sorted: {})",
        times[reps / 2] * 1e3,
        all.join(" ")
    );
}
