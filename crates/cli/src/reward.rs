//! `kiln reward`: preference pairs in, a reward model (LlamaForSequenceClassification) out;
//! `kiln score`: rewards of examples, or the accuracy of a preference file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_data::chat::{read_prefs, read_rows, Turn};
use kiln_engine::SamplingParams;
use kiln_model::reward::RewardModel;
use kiln_model::{default_device, ModelDir};
use kiln_train::stages::reward::{encode_answer, pair_metrics, tokenize_pairs, RewardStage};
use kiln_train::Trainer;

use crate::pretrain::CommonTrainArgs;

#[derive(Args)]
pub struct RewardArgs {
    /// The starting model directory (the SFT model, usually).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL preference pairs: prompt/chosen/rejected, or implicit chosen/rejected dialogues.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Held-out pairs; by default `prefs_eval.jsonl` beside the data, else 5% of it.
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Bradley–Terry margin: the chosen answer must win by this much.
    #[arg(long, default_value_t = 0.0)]
    pub margin: f64,
    /// Coefficient of the centering penalty (r_chosen + r_rejected)².
    #[arg(long, default_value_t = 0.01)]
    pub center: f64,
    #[arg(long)]
    pub skip_bad: bool,
    #[arg(long)]
    pub world: Option<PathBuf>,
    /// Do not shift rewards so that the starting model's answers score 0 on average.
    #[arg(long)]
    pub no_normalize: bool,
    /// Train the body with LoRA (saved merged, plus the adapter in `adapter/`) or freezing.
    /// Default: the config's peft.method.
    #[arg(long, value_enum)]
    pub peft: Option<crate::peft_cmd::Peft>,
    #[command(flatten)]
    pub common: CommonTrainArgs,
}

pub fn run(a: RewardArgs) -> Result<serde_json::Value> {
    let mut config = a.common.resolve("reward")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let device = default_device().autodiff();
    let dir = ModelDir::load(&a.model, &device)
        .with_context(|| format!("loading --model {}", a.model.display()))?;
    let tk = dir.tokenizer.clone();
    let sft_model = dir.model.clone();
    let (mut train, bad, [explicit, implicit]) =
        kiln_data::chat::read_prefs_detected(&a.data, a.skip_bad)?;
    tracing::info!(
        "reward: read {} preference pairs (explicit prompt/chosen/rejected: {explicit}, implicit shared-prefix dialogues: {implicit})",
        train.len()
    );
    if !bad.is_empty() {
        tracing::warn!("skipped {} malformed rows; first: {}", bad.len(), bad[0]);
    }
    let eval_paths = crate::pretrain::eval_files(&a.eval_data, &a.data, "prefs_eval.jsonl");
    let eval = if eval_paths.is_empty() {
        let n = ((train.len() as f64) * config.data.val_fraction).ceil() as usize;
        train.split_off(train.len() - n.max(1).min(train.len().saturating_sub(1)))
    } else {
        read_prefs(&eval_paths, a.skip_bad)?.0
    };
    let world = crate::sft::find_world(a.world.as_deref(), &a.data)?;
    let (train_t, long1) = tokenize_pairs(&tk, &train, config.data.seq_len, world.as_ref())?;
    let (eval_t, long2) = tokenize_pairs(&tk, &eval, config.data.seq_len, world.as_ref())?;
    if long1 + long2 > 0 {
        tracing::warn!(
            "{} pairs longer than data.seq_len = {} were dropped",
            long1 + long2,
            config.data.seq_len
        );
    }
    if train_t.is_empty() {
        bail!(
            "no preference pair fits in data.seq_len = {}",
            config.data.seq_len
        );
    }
    tracing::info!(
        "reward: {} training pairs, {} held out",
        train_t.len(),
        eval_t.len()
    );
    let body = crate::peft_cmd::prepare(
        dir.model,
        &mut config,
        a.peft,
        &a.model,
        &["lora", "freeze"],
    )?;
    let model = RewardModel::from_llama(body, config.seed);
    let mut stage = RewardStage::new(train_t, eval_t, &config, a.margin, a.center);
    let trainer = Trainer {
        name: "reward".into(),
        config: config.clone(),
        out: a.out.clone(),
        tokenizer: tk.clone(),
        resume: a.common.resume,
        stop_after: None,
        peak_gflops: None,
    };
    let (model, outcome) = trainer.run(model, &mut stage)?;
    let mut summary = crate::pretrain::stage_summary(
        serde_json::json!({"stage": "reward", "out": a.out, "pairs": train.len()}),
        &outcome,
    );
    if outcome.interrupted {
        return Ok(summary);
    }
    // Normalize: the starting model's sampled answers score 0 on average (PPO's baseline).
    let mut model = kiln_model::burn::module::Module::valid(&model);
    if !a.no_normalize {
        let mut seen = std::collections::BTreeSet::new();
        let prompts: Vec<Vec<Turn>> = train
            .iter()
            .filter(|p| seen.insert(p.prompt.clone()))
            .take(64)
            .map(|p| p.prompt.clone())
            .collect();
        let sft = kiln_model::burn::module::Module::valid(&sft_model);
        let answers = kiln_eval::answer_prompts(
            &sft,
            &tk,
            &prompts,
            &SamplingParams {
                temperature: 1.0,
                max_new_tokens: 32,
                seed: config.seed,
                ..Default::default()
            },
            32,
        )?;
        let seqs: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&answers)
            .map(|(p, (ans, _))| encode_answer(&tk, p, ans))
            .collect::<Result<_, _>>()?;
        let scores: Vec<f32> = seqs.chunks(32).flat_map(|c| model.score(c)).collect();
        let offset = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len().max(1) as f64;
        model.offset = offset;
        model.save(&a.out)?;
        summary["reward_offset"] = offset.into();
        tracing::info!("reward: offset {offset:.4} (mean raw score of the starting model's answers) recorded in config.json");
    }
    if a.common.json {
        println!("{summary}");
    } else {
        println!(
            "reward: wrote {} ({} steps, {:.0}s): held-out accuracy {:.1}%{}",
            a.out.display(),
            outcome.step,
            outcome.wall_s,
            100.0 * summary["accuracy"].as_f64().unwrap_or(0.0),
            summary["gold_agreement"]
                .as_f64()
                .map_or(String::new(), |g| format!(
                    ", gold agreement {:.1}%",
                    100.0 * g
                ))
        );
    }
    Ok(summary)
}

#[derive(Args)]
pub struct ScoreArgs {
    #[arg(long)]
    pub reward_model: PathBuf,
    /// JSONL: preference pairs (prints accuracy), or rows with `prompt` and `response`/`completion`
    /// or `messages` ending in an assistant turn (prints one reward per row).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let device = default_device();
    let rm = RewardModel::load(&a.reward_model, &device)
        .with_context(|| format!("loading {}", a.reward_model.display()))?;
    let tk = kiln_tokenizer::Tokenizer::load(&a.reward_model)?;
    let first: serde_json::Value = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading {}", a.data.display()))?
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .transpose()?
        .context("empty file")?;
    if first.get("chosen").is_some() {
        let (pairs, _) = read_prefs(std::slice::from_ref(&a.data), false)?;
        let (tp, dropped) =
            tokenize_pairs(&tk, &pairs, rm.base.config.max_position_embeddings, None)?;
        let m = pair_metrics(&rm, &tp, 16, 0.0);
        let obj: serde_json::Map<String, serde_json::Value> =
            m.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
        if a.json {
            println!(
                "{}",
                serde_json::json!({"pairs": tp.len(), "dropped": dropped, "metrics": obj})
            );
        } else {
            println!(
                "{} pairs ({} too long, dropped): accuracy {:.1}%, mean margin {:.3}",
                tp.len(),
                dropped,
                100.0 * obj["accuracy"].as_f64().unwrap_or(0.0),
                obj["mean_margin"].as_f64().unwrap_or(0.0)
            );
        }
        return Ok(());
    }
    let (rows, _) = read_rows(&a.data, false, |v| {
        if v.get("messages").is_some() {
            let (_, turns) = kiln_data::chat::parse_sft_row(v)?;
            let last = turns.len() - 1;
            if turns[last].role != "assistant" {
                return Err("`messages` must end with the assistant turn to score".into());
            }
            Ok((turns[..last].to_vec(), turns[last].content.clone()))
        } else {
            let p = v
                .get("prompt")
                .and_then(|x| x.as_str())
                .ok_or("no string `prompt`")?;
            let r = v
                .get("response")
                .or(v.get("completion"))
                .and_then(|x| x.as_str())
                .ok_or("no string `response` or `completion`")?;
            Ok((vec![Turn::new("user", p)], r.to_string()))
        }
    })?;
    for chunk in rows.chunks(16) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(p, r)| encode_answer(&tk, p, r))
            .collect::<Result<_, _>>()?;
        for ((p, r), s) in chunk.iter().zip(rm.score(&seqs)) {
            println!(
                "{}",
                serde_json::json!({"prompt": p.last().map(|t| t.content.clone()), "response": r, "reward": s})
            );
        }
    }
    Ok(())
}
