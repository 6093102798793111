//! `kiln pretrain`: a corpus in, a base model (HF directory) out.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use kiln_model::{default_device, Llama};
use kiln_tokenizer::Tokenizer;
use kiln_train::stages::pretrain::{prepare_shard, Pretrain};
use kiln_train::{TrainConfig, Trainer};

/// Flags every training subcommand shares.
#[derive(Args, Clone, Debug)]
pub struct CommonTrainArgs {
    /// A preset (tiny, small, test) or a TOML file; see configs/.
    #[arg(long)]
    pub config: Option<String>,
    /// Override a config key, e.g. --set optim.lr=3e-4 (repeatable).
    #[arg(long = "set")]
    pub sets: Vec<String>,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the final summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl CommonTrainArgs {
    /// The resolved config: preset or file < --set < plain flags.
    pub fn resolve(&self, default_preset: &str) -> Result<TrainConfig> {
        let mut c = TrainConfig::load(self.config.as_deref().unwrap_or(default_preset))?;
        c.apply_overrides(&self.sets)?;
        if let Some(n) = self.max_steps {
            c.schedule.max_steps = n;
        }
        if let Some(s) = self.seed {
            c.seed = s;
        }
        Ok(c)
    }
}

#[derive(Args)]
pub struct PretrainArgs {
    /// Text files or folders (documents split on blank lines), or JSONL / Parquet with a `text`
    /// key or column.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// tokenizer.json or a directory holding one; trained on --data when absent.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Continue pre-training an existing HF model directory.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Leave malformed documents out (counted, with a warning) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Each plain text file is one document (default: documents are split on blank lines).
    #[arg(long)]
    pub doc_per_file: bool,
    #[command(flatten)]
    pub common: CommonTrainArgs,
}

/// The tokenizer to use: given, the init model's, one saved by an earlier run, or a new one
/// trained on the corpus.
pub fn tokenizer_for(
    given: Option<&Path>,
    init: Option<&Path>,
    data: &[PathBuf],
    out: &Path,
    vocab: usize,
) -> Result<Tokenizer> {
    if let Some(p) = given.or(init) {
        return Ok(Tokenizer::load(p)?);
    }
    let saved = out.join("tokenizer");
    if saved.join("tokenizer.json").exists() {
        return Ok(Tokenizer::load(&saved)?);
    }
    // The BPE trainer reads raw lines: JSONL documents are written out as text first.
    let mut files = Vec::new();
    let tmp = out.join(".tokenizer-corpus.txt");
    let mut text = String::new();
    for input in data {
        for f in kiln_data::shards::expand(input)? {
            if matches!(
                f.extension().and_then(|e| e.to_str()),
                Some("jsonl") | Some("json")
            ) {
                for doc in kiln_data::read_documents(&f)? {
                    text.push_str(&doc?);
                    text.push_str("\n\n");
                }
            } else {
                files.push(f);
            }
        }
    }
    if !text.is_empty() {
        std::fs::create_dir_all(out)?;
        std::fs::write(&tmp, text)?;
        files.push(tmp.clone());
    }
    tracing::info!(
        "training a {vocab}-token byte-level BPE tokenizer on {} file(s)",
        files.len()
    );
    let tk = Tokenizer::train(&files, vocab)?;
    tk.save(&saved, None)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(tk)
}

/// Held-out files: those given, else `name` beside the first data file when it exists and is not
/// itself among the data.
pub fn eval_files(given: &[PathBuf], data: &[PathBuf], name: &str) -> Vec<PathBuf> {
    if !given.is_empty() {
        return given.to_vec();
    }
    data.first()
        .and_then(|d| d.parent())
        .map(|p| p.join(name))
        .filter(|p| p.exists() && !data.contains(p))
        .into_iter()
        .collect()
}

/// A stage's summary: `fields` plus the run's outcome and its last evaluation.
pub fn stage_summary(
    mut fields: serde_json::Value,
    outcome: &kiln_train::TrainOutcome,
) -> serde_json::Value {
    for (k, v) in [
        ("step", outcome.step.into()),
        ("interrupted", outcome.interrupted.into()),
        ("wall_s", outcome.wall_s.into()),
        ("tokens", outcome.tokens.into()),
        ("params", outcome.params.into()),
        ("trainable_params", outcome.trainable_params.into()),
        ("flops", outcome.flops.into()),
        ("mfu", outcome.mfu.into()),
    ] {
        fields[k] = v;
    }
    for (k, v) in &outcome.last_eval {
        fields[k] = (*v).into();
    }
    fields
}

pub fn run(a: PretrainArgs) -> Result<serde_json::Value> {
    let config = a.common.resolve("tiny")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let tk = tokenizer_for(
        a.tokenizer.as_deref(),
        a.init.as_deref(),
        &a.data,
        &a.out,
        config.model.vocab_size,
    )?;
    let device = default_device().autodiff();
    let model = match &a.init {
        Some(dir) => kiln_model::checkpoint::load_llama(dir, &device)
            .with_context(|| format!("loading --init {}", dir.display()))?,
        None => Llama::init(&config.llama_config(&tk), config.seed, &device)?,
    };
    kiln_model::model_dir::check_vocab(&tk, &model)?;
    let shard = prepare_shard(
        &a.data,
        &tk,
        &a.out.join("data"),
        kiln_data::shards::ReadOptions {
            skip_bad: a.skip_bad,
            whole_files: a.doc_per_file,
        },
    )?;
    tracing::info!(
        "pretrain: {} tokens in {} documents",
        shard.meta.num_tokens,
        shard.meta.num_documents
    );
    let mut stage = Pretrain::new(shard, &tk, &config, &device)?;
    let trainer = Trainer {
        name: "pretrain".into(),
        config,
        out: a.out.clone(),
        tokenizer: tk,
        resume: a.common.resume,
        stop_after: None,
        peak_gflops: None,
    };
    let (_, outcome) = trainer.run(model, &mut stage)?;
    let summary = stage_summary(
        serde_json::json!({"stage": "pretrain", "out": a.out, "best_val_loss": outcome.best_val}),
        &outcome,
    );
    if a.common.json {
        println!("{summary}");
    } else if !outcome.interrupted {
        println!(
            "pretrain: wrote {} ({} steps, {:.0}s)",
            a.out.display(),
            outcome.step,
            outcome.wall_s
        );
    }
    Ok(summary)
}
