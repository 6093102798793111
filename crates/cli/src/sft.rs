//! `kiln sft`: a base model and demonstrations in, an assistant model out.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use kiln_data::chat::{read_sft, read_sft_detected};
use kiln_data::world::{load_world, World};
use kiln_model::default_device;
use kiln_train::stages::sft::Sft;
use kiln_train::Trainer;

use crate::peft_cmd::Peft;
use crate::pretrain::CommonTrainArgs;

#[derive(Args)]
pub struct SftArgs {
    /// The model directory to fine-tune (HF format, with its tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL: messages, prompt/completion, Alpaca or ShareGPT rows.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Held-out conversations; by default `sft_eval.jsonl` beside the data, else 5% of it.
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Parameter-efficient method (default: the config's peft.method, `none` = full
    /// fine-tuning). LoRA, adapters and prefixes write an adapter directory.
    #[arg(long, value_enum)]
    pub peft: Option<Peft>,
    /// Train on every token, prompts included (default: assistant tokens only).
    #[arg(long)]
    pub all_tokens: bool,
    /// Skip malformed rows (counted) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// The built-in world's world.json, to score answers with the gold reward; found beside the
    /// data when present.
    #[arg(long)]
    pub world: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonTrainArgs,
}

/// world.json given, or beside the first data file.
pub fn find_world(given: Option<&Path>, data: &[PathBuf]) -> Result<Option<World>> {
    let path = match given {
        Some(p) => Some(p.to_path_buf()),
        None => data
            .first()
            .and_then(|d| d.parent())
            .map(|p| p.join("world.json"))
            .filter(|p| p.exists()),
    };
    Ok(match path {
        Some(p) => Some(load_world(&p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    })
}

pub fn run(a: SftArgs) -> Result<serde_json::Value> {
    let mut config = a.common.resolve("sft")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let device = default_device().autodiff();
    let dir = kiln_model::ModelDir::load(&a.model, &device)
        .with_context(|| format!("loading --model {}", a.model.display()))?;
    let model = crate::peft_cmd::prepare(
        dir.model,
        &mut config,
        a.peft,
        &a.model,
        &["lora", "adapter", "prefix", "freeze"],
    )?;
    let (mut train, bad, formats) = read_sft_detected(&a.data, a.skip_bad)?;
    let formats: Vec<String> = formats.iter().map(|(f, n)| format!("{f}: {n}")).collect();
    tracing::info!(
        "sft: read {} conversations ({})",
        train.len(),
        formats.join(", ")
    );
    if !bad.is_empty() {
        tracing::warn!("skipped {} malformed rows; first: {}", bad.len(), bad[0]);
    }
    let eval_paths = crate::pretrain::eval_files(&a.eval_data, &a.data, "sft_eval.jsonl");
    let eval = if eval_paths.is_empty() {
        let n = ((train.len() as f64) * config.data.val_fraction).ceil() as usize;
        train.split_off(train.len() - n.max(1).min(train.len() - 1))
    } else {
        read_sft(&eval_paths, a.skip_bad)?.0
    };
    let world = find_world(a.world.as_deref(), &a.data)?;
    let (mut stage, truncated) =
        Sft::new(&dir.tokenizer, &train, &eval, world, &config, a.all_tokens)?;
    if truncated > 0 {
        tracing::warn!(
            "{truncated} of {} conversations are longer than data.seq_len = {} and were truncated",
            train.len(),
            config.data.seq_len
        );
    }
    tracing::info!(
        "sft: {} training conversations, {} held out",
        stage.len(),
        eval.len()
    );
    let trainer = Trainer {
        name: "sft".into(),
        config,
        out: a.out.clone(),
        tokenizer: dir.tokenizer.clone(),
        resume: a.common.resume,
        stop_after: None,
        peak_gflops: None,
    };
    let (_, outcome) = trainer.run(model, &mut stage)?;
    let summary = crate::pretrain::stage_summary(
        serde_json::json!({"stage": "sft", "out": a.out, "truncated": truncated}),
        &outcome,
    );
    if a.common.json {
        println!("{summary}");
    } else if !outcome.interrupted {
        println!(
            "sft: wrote {} ({} steps, {:.0}s)",
            a.out.display(),
            outcome.step,
            outcome.wall_s
        );
    }
    Ok(summary)
}
