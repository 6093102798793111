//! What `first_pass` and `ppo_minibatches` share: a PPO stage and its policy and critic at TRL's
//! benchmark shapes (`tiny` models, 64 prompts, 32 new tokens, 4 x 4 minibatches) on a small
//! built-in world.

use kiln_model::reward::RewardModel;
use kiln_model::{default_device, Llama, LlamaConfig};
use kiln_train::stages::ppo::{ActorCritic, Ppo};

/// The stage, the trained models and the minibatches per iteration. `generation`: the old
/// log-probabilities from the sampler. (The world's files are read into memory here: the
/// stage does not keep them.)
pub struct Setup {
    pub stage: Ppo,
    pub model: ActorCritic,
    pub per: usize,
}

pub fn setup(generation: bool) -> Setup {
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
    let stage = Ppo::new(
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
    Setup { stage, model, per }
}
