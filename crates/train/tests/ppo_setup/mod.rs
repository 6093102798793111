//! The PPO tests' small set-up on the built-in world: a tokenizer, the `ppo` preset at test
//! sizes, the models (policy and critic under autodiff, reference and reward model without) and
//! the stage. Shared by the test binaries that run PPO.

use kiln_data::chat::read_prompts;
use kiln_model::reward::RewardModel;
use kiln_model::{default_device, Llama, LlamaConfig};
use kiln_tokenizer::Tokenizer;
use kiln_train::stages::ppo::{ActorCritic, Ppo};
use kiln_train::stages::pretrain::prepare_shard;
use kiln_train::TrainConfig;

pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub root: std::path::PathBuf,
    pub tk: Tokenizer,
    pub config: TrainConfig,
    pub policy_cfg: LlamaConfig,
}

pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    kiln_data::world::synth(&root.join("world"), 2, 0.05).unwrap();
    let tk = Tokenizer::train(&[root.join("world/corpus.txt")], 400).unwrap();
    let mut config = TrainConfig::load("ppo").unwrap();
    config.ppo.prompts_per_iter = 8;
    config.ppo.max_new_tokens = 6;
    config.ppo.eval_prompts = 4;
    config.ppo.ptx_batch = 2;
    config.ppo.ptx_seq_len = 16;
    config.log.progress = false;
    config.optim.lr = 1e-3;
    let mut policy_cfg = LlamaConfig::new(tk.vocab_size(), 32, 64, 2, 4, 2, 128);
    policy_cfg.tie_word_embeddings = true;
    policy_cfg.eos_token_id = tk.eos_id().map(kiln_model::config::TokenIds::One);
    Setup {
        _dir: dir,
        root,
        tk,
        config,
        policy_cfg,
    }
}

pub fn models(s: &Setup) -> (ActorCritic, Llama, RewardModel) {
    let ad = default_device().autodiff();
    let d = default_device();
    let policy = Llama::init(&s.policy_cfg, 1, &ad).unwrap();
    let reference = Llama::init(&s.policy_cfg, 1, &d).unwrap();
    let reward = RewardModel::from_llama(Llama::init(&s.policy_cfg, 2, &d).unwrap(), 3);
    let critic = RewardModel::from_llama(Llama::init(&s.policy_cfg, 2, &ad).unwrap(), 3);
    (ActorCritic::with_critic(policy, critic), reference, reward)
}

pub fn stage(s: &Setup, reference: Llama, reward: RewardModel) -> Ppo {
    let (prompts, _) = read_prompts(&[s.root.join("world/prompts.jsonl")], false).unwrap();
    let (eval, _) = read_prompts(&[s.root.join("world/prompts_eval.jsonl")], false).unwrap();
    let world = kiln_data::world::load_world(&s.root.join("world/world.json")).unwrap();
    let shard = prepare_shard(
        &[s.root.join("world/corpus.txt")],
        &s.tk,
        &s.root.join("shard"),
        Default::default(),
    )
    .unwrap();
    Ppo::new(
        s.config.ppo.clone(),
        prompts,
        eval[..4].to_vec(),
        &s.tk,
        Some(reference),
        reward,
        Some(world),
        Some(shard),
        s.config.seed,
    )
}
