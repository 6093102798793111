//! PEFT on the command line: the `--peft` flag of the training stages, turning a loaded model
//! into the one a stage trains, and `kiln merge` (fold a LoRA adapter into a plain model).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kiln_model::adapter_dir::{is_adapter_dir, load_adapter, load_any, read_adapter_config};
use kiln_model::peft::{apply, into_base, merge_lora};
use kiln_model::{default_device, Llama, ModelDir};
use kiln_tokenizer::{Tokenizer, TOKENIZER_FILE};
use kiln_train::TrainConfig;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Peft {
    /// Full fine-tuning: every parameter trains.
    None,
    /// Low-rank updates of the projections (peft.lora_r, lora_alpha, lora_targets).
    Lora,
    /// Bottleneck adapters after attention and/or MLP (peft.adapter_size, adapter_placement).
    Adapter,
    /// Trained key/value prefixes per layer (peft.prefix_len, prefix_hidden).
    Prefix,
    /// Train only what peft.train / peft.train_last_layers name.
    Freeze,
}

impl Peft {
    pub fn name(self) -> &'static str {
        match self {
            Peft::None => "none",
            Peft::Lora => "lora",
            Peft::Adapter => "adapter",
            Peft::Prefix => "prefix",
            Peft::Freeze => "freeze",
        }
    }
}

/// The model a stage trains: the loaded one (an adapter folded in first) with the PEFT modules
/// of `config.peft` (the `--peft` flag, when given, replaces `peft.method`). `allowed` lists
/// the methods the stage supports.
pub fn prepare(
    model: Llama,
    config: &mut TrainConfig,
    flag: Option<Peft>,
    from: &Path,
    allowed: &[&str],
) -> Result<Llama> {
    if let Some(f) = flag {
        config.peft.method = f.name().into();
    }
    let m = config.peft.methods()?;
    for (on, name) in [
        (m.lora, "lora"),
        (m.adapter, "adapter"),
        (m.prefix, "prefix"),
        (m.freeze, "freeze"),
    ] {
        if on && !allowed.contains(&name) {
            bail!(
                "--peft {name} is not available for this stage (it supports: none, {})",
                allowed.join(", ")
            );
        }
    }
    // An adapter directory is folded into its weights; a new adapter records that directory as
    // its base, and loading it folds the chain again.
    let model = into_base(model)?;
    if !m.any() {
        return Ok(model);
    }
    Ok(apply(model, &config.peft, from, config.seed)?)
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model directory the adapter was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged, plain model directory.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn merge(a: MergeArgs) -> Result<()> {
    if !is_adapter_dir(&a.adapter) {
        bail!(
            "{} is not an adapter directory (no adapter_config.json; `kiln sft --peft lora` writes one)",
            a.adapter.display()
        );
    }
    let device = default_device();
    let base = into_base(load_any(&a.model, &device)?)
        .with_context(|| format!("loading --model {}", a.model.display()))?;
    let (config, _) = read_adapter_config(&a.adapter)?;
    let model = load_adapter(base, &a.model, &a.adapter)
        .with_context(|| format!("applying --adapter {}", a.adapter.display()))?;
    let model = merge_lora(model)?;
    let tk_dir = if a.adapter.join(TOKENIZER_FILE).exists() {
        &a.adapter
    } else {
        &a.model
    };
    let tokenizer = Tokenizer::load(&tk_dir.join(TOKENIZER_FILE))?;
    ModelDir::save(&model, &tokenizer, &a.out)?;
    println!(
        "merged {} (LoRA r={}, alpha={}) into {}: wrote {}",
        a.adapter.display(),
        config.lora_r,
        config.lora_alpha,
        a.model.display(),
        a.out.display()
    );
    Ok(())
}
