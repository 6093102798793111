//! A PPO update's minibatches alone at TRL's benchmark shapes (`tiny` policy and critic, 64
//! prompts, 32 new tokens, 4 x 4 minibatches): one rollout, then the gradients of minibatches
//! 1 to 15 of its iteration (each the policy's and the critic's forward and backward passes side
//! by side, no optimizer step, so every round sees the same weights), six rounds: the median
//! minibatch and the FLOPs per second over all of them as the trainer counts them
//! (`perf::FlopCount`). What an update costs without the rollout, the scoring pass or AdamW, for
//! a profile of the update alone (`perf record`).
//! `cargo run --release -p kiln-train --example ppo_minibatches`.

use kiln_train::perf::FlopCount;
use kiln_train::trainer::Stage;
use std::time::Instant;

#[path = "support/trl_ppo.rs"]
mod trl_ppo;

fn main() {
    kiln_model::tune_allocator();
    // On a worker of rayon's pool, as `kiln` runs.
    rayon::scope(|_| run());
}

fn run() {
    let trl_ppo::Setup {
        mut stage,
        model,
        per,
    } = trl_ppo::setup(false);
    let count = FlopCount::new(&model.policy.config, 1.0);
    // Minibatch 0 makes the iteration's rollout (and reuses its scoring pass's forward).
    drop(stage.train_grads(&model, 0, 0, 1.0).unwrap());
    let (mut times, mut flops) = (vec![], 0.0);
    for _ in 0..6 {
        for step in 1..per {
            let start = Instant::now();
            let grads = stage.train_grads(&model, step, 0, 1.0).unwrap();
            times.push(start.elapsed().as_secs_f64());
            flops += stage.flops(&count, step, 0).expect("a minibatch's FLOPs");
            drop(grads);
        }
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    println!(
        "{} minibatches: median {:.1} ms, {:.1} GFLOP/s over all",
        times.len(),
        times[times.len() / 2] * 1e3,
        flops / total / 1e9
    );
}
