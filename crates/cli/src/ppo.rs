//! `kiln ppo`: an SFT policy, a reward model and prompts in; a policy optimized for the reward
//! (with a KL penalty to the SFT model and the pre-training loss mixed in) out.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_data::chat::read_prompts;
use kiln_model::reward::RewardModel;
use kiln_model::{default_device, ModelDir};
use kiln_train::stages::ppo::{ActorCritic, Ppo};
use kiln_train::stages::pretrain::prepare_shard;
use kiln_train::Trainer;

use crate::peft_cmd::Peft;
use crate::pretrain::CommonTrainArgs;

#[derive(Args)]
pub struct PpoArgs {
    /// The starting policy (the SFT model directory).
    #[arg(long)]
    pub policy: PathBuf,
    /// The reward model directory (kiln reward); the critic starts from it too unless
    /// ppo.critic = "policy_head".
    #[arg(long)]
    pub reward_model: PathBuf,
    /// Prompts: JSONL `prompt` / `messages` ending in a user turn, or text one per line.
    #[arg(long, required = true, num_args = 1..)]
    pub prompts: Vec<PathBuf>,
    /// Held-out prompts; by default `prompts_eval.jsonl` beside the prompts, else a few of them.
    #[arg(long, num_args = 1..)]
    pub eval_prompts: Vec<PathBuf>,
    /// Pre-training text for the PPO-ptx term (omit, or set ppo.ptx_coef=0, for plain PPO).
    #[arg(long, num_args = 1..)]
    pub ptx_data: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub world: Option<PathBuf>,
    /// Train the policy with LoRA (its reference is then the policy with the adapter off, not
    /// a second copy) or with freezing (peft.train patterns). Default: the config's peft.method.
    #[arg(long, value_enum)]
    pub peft: Option<Peft>,
    #[command(flatten)]
    pub common: CommonTrainArgs,
}

pub fn run(a: PpoArgs) -> Result<serde_json::Value> {
    let mut config = a.common.resolve("ppo")?;
    // Iterations → optimizer steps.
    let per = config.ppo.epochs.max(1) * config.ppo.minibatches.max(1);
    config.schedule.max_steps *= per;
    config.schedule.warmup_steps *= per;
    config.eval.every *= per;
    config.checkpoint.every *= per;
    config.log.every *= per;
    config.optim.grad_accum = 1;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let train_device = default_device().autodiff();
    let device = default_device();
    let dir = ModelDir::load(&a.policy, &train_device)
        .with_context(|| format!("loading --policy {}", a.policy.display()))?;
    let tk = dir.tokenizer.clone();
    let policy = crate::peft_cmd::prepare(
        dir.model,
        &mut config,
        a.peft,
        &a.policy,
        &["lora", "freeze"],
    )?;
    let reference = if policy.has_peft_modules() {
        None
    } else {
        Some(kiln_model::peft::into_base(
            kiln_model::adapter_dir::load_any(&a.policy, &device)?,
        )?)
    };
    let reward = RewardModel::load(&a.reward_model, &device)
        .with_context(|| format!("loading --reward-model {}", a.reward_model.display()))?;
    let (prompts, _) = read_prompts(&a.prompts, false)?;
    let eval_paths = crate::pretrain::eval_files(&a.eval_prompts, &a.prompts, "prompts_eval.jsonl");
    let mut eval_prompts = if eval_paths.is_empty() {
        prompts.clone()
    } else {
        read_prompts(&eval_paths, false)?.0
    };
    eval_prompts.truncate(config.ppo.eval_prompts.max(1));
    let world = crate::sft::find_world(a.world.as_deref(), &a.prompts)?;
    let ptx = if a.ptx_data.is_empty() || config.ppo.ptx_coef == 0.0 {
        config.ppo.ptx_coef = 0.0;
        None
    } else {
        Some(prepare_shard(
            &a.ptx_data,
            &tk,
            &a.out.join("ptx-data"),
            Default::default(),
        )?)
    };
    tracing::info!(
        "ppo: {} prompts, {} held out, {} iterations of {} optimizer steps",
        prompts.len(),
        eval_prompts.len(),
        config.schedule.max_steps / per,
        per
    );
    let mut stage = Ppo::new(
        config.ppo.clone(),
        prompts,
        eval_prompts,
        &tk,
        reference,
        reward,
        world,
        ptx,
        config.seed,
    );
    let model = match config.ppo.critic.as_str() {
        "reward_model" => {
            ActorCritic::with_critic(policy, RewardModel::load(&a.reward_model, &train_device)?)
        }
        "policy_head" => ActorCritic::with_value_head(policy),
        other => {
            anyhow::bail!("ppo.critic = {other:?}: expected \"reward_model\" or \"policy_head\"")
        }
    };
    let trainer = Trainer {
        name: "ppo".into(),
        config,
        out: a.out.clone(),
        tokenizer: tk,
        resume: a.common.resume,
        stop_after: None,
        peak_gflops: None,
    };
    let (_, outcome) = trainer.run(model, &mut stage)?;
    let summary = crate::pretrain::stage_summary(
        serde_json::json!({"stage": "ppo", "out": a.out, "iterations": outcome.step / per, "beta": stage.kl.beta}),
        &outcome,
    );
    if a.common.json {
        println!("{summary}");
    } else if !outcome.interrupted {
        println!(
            "ppo: wrote {} ({} iterations, {:.0}s)",
            a.out.display(),
            outcome.step / per,
            outcome.wall_s
        );
    }
    Ok(summary)
}
