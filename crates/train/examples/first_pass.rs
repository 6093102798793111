//! A PPO iteration's rollout (generation and scoring) and its first minibatch (forward,
//! backward) at TRL's benchmark shapes (`tiny` models, 64 prompts, 32 new tokens, 4 x 4
//! minibatches), with the scoring pass's forward reused for that minibatch (`Ppo::
//! reuse_first_pass`, the default) and without, alternating in one process: medians of 9 of
//! the scoring time and of the minibatch's.
//! `cargo run --release -p kiln-train --example first_pass [generation]` (`generation`: the old
//! log-probabilities from the sampler, so only the critic's pass is reused).

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
    let generation = std::env::args().nth(1).as_deref() == Some("generation");
    let trl_ppo::Setup {
        mut stage,
        model,
        per,
    } = trl_ppo::setup(generation);
    // [reuse off, on] x [scoring, first minibatch], in ms.
    let mut times = [[vec![], vec![]], [vec![], vec![]]];
    for round in 0..11 {
        for (reuse, t) in times.iter_mut().enumerate() {
            stage.reuse_first_pass = reuse == 1;
            // A new iteration each time (a rollout, then its first minibatch); no optimizer
            // step, so every iteration starts from the same weights.
            let iter = 2 * round + reuse;
            let (score0, rollout0) = (stage.score_s, stage.rollout_s);
            let start = Instant::now();
            let g = stage.train_grads(&model, iter * per, 0, 1.0).unwrap();
            let all = start.elapsed().as_secs_f64();
            drop(g);
            let minibatch = all - (stage.rollout_s - rollout0);
            if round >= 2 {
                t[0].push((stage.score_s - score0) * 1e3);
                t[1].push(minibatch * 1e3);
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (reuse, t) in times.iter_mut().enumerate() {
        let (s, m) = (med(&mut t[0]), med(&mut t[1]));
        println!(
            "reuse {:5}: scoring {s:.1} ms, first minibatch {m:.1} ms, both {:.1} ms",
            reuse == 1,
            s + m
        );
    }
}
