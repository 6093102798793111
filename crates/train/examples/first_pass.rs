//! A PPO iteration's rollout (generation and scoring) and its first minibatch (forward,
//! backward) at TRL's benchmark shapes (`tiny` models, 64 prompts, 32 new tokens, 4 x 4
//! minibatches), with the scoring pass's forward reused for that minibatch (`Ppo::
//! reuse_first_pass`, the default) and without, alternating in one process: medians of 9 of
//! the scoring time and of the minibatch's.
//! `cargo run --release -p kiln-train --example first_pass [generation]` (`generation`: the old
//! log-probabilities from the sampler, so only the critic's pass is reused).

use kiln_model::reward::RewardModel;
use kiln_model::{default_device, Llama, LlamaConfig};
use kiln_train::stages::ppo::{ActorCritic, Ppo};
use kiln_train::trainer::Stage;
use std::time::Instant;

fn main() {
    kiln_model::tune_allocator();
    // On a worker of rayon's pool, as `kiln` runs.
    rayon::scope(|_| run());
}

fn run() {
    let generation = std::env::args().nth(1).as_deref() == Some("generation");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    kiln_data::world::synth(&root.join("world"), 0, 0.05).unwrap();
    let tk = kiln_tokenizer::Tokenizer::train(&[root.join("world/corpus.txt")], 1024).unwrap();
    let mut cfg = LlamaConfig::new(4096, 256, 688, 4, 4, 4, 256);
    cfg.eos_token_id = tk.eos_id().map(kiln_model::config::TokenIds::One);
    let mut train = kiln_train::TrainConfig::load("ppo").unwrap();
    train.ppo.trl_benchmark_shapes();
    if generation {
        train.ppo.old_logprobs = kiln_train::config::OldLogprobs::Generation;
    }
    let per = train.ppo.epochs * train.ppo.minibatches;
    let (ad, d) = (default_device().autodiff(), default_device());
    let (prompts, _) =
        kiln_data::chat::read_prompts(&[root.join("world/prompts.jsonl")], false).unwrap();
    let mut stage = Ppo::new(
        train.ppo.clone(),
        prompts.clone(),
        prompts[..4].to_vec(),
        &tk,
        Some(Llama::init(&cfg, 1, &d).unwrap()),
        RewardModel::from_llama(Llama::init(&cfg, 2, &d).unwrap(), 3),
        None,
        None,
        0,
    );
    let model = ActorCritic::with_critic(
        Llama::init(&cfg, 1, &ad).unwrap(),
        RewardModel::from_llama(Llama::init(&cfg, 2, &ad).unwrap(), 3),
    );
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
