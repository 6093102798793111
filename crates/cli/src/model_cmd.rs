//! `kiln model init`: an untrained model directory of a given shape with a given tokenizer, and
//! `kiln model info`: what a model directory holds.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_model::{default_device, Llama, LlamaConfig, ModelDir};
use kiln_tokenizer::Tokenizer;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Create an untrained model directory (HF format) with a tokenizer.
    Init(InitArgs),
    /// Print a model directory's architecture and parameter count.
    Info {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct InitArgs {
    /// Directory (or tokenizer.json) of the tokenizer the model will use.
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Shape preset: tiny (4 layers, d=256, ~5M params with a 4k vocab) or small (~30M).
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The shape presets shared by `model init` and `bench`.
pub fn preset(name: &str, vocab: usize) -> Result<LlamaConfig> {
    Ok(match name {
        // The PyTorch comparison's `tiny`: 4 layers, d=256, FFN 688, context 256.
        "tiny" => LlamaConfig::new(vocab, 256, 688, 4, 4, 4, 256),
        "small" => LlamaConfig::new(vocab, 512, 1376, 8, 8, 8, 512),
        "test" => LlamaConfig::new(vocab, 64, 128, 2, 4, 2, 128),
        other => anyhow::bail!("unknown preset {other:?}: expected tiny, small or test"),
    })
}

pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Init(a) => {
            let tk = Tokenizer::load(&a.tokenizer)?;
            let mut config = preset(&a.preset, tk.vocab_size())?;
            config.bos_token_id = tk.bos_id();
            config.eos_token_id = tk.eos_id().map(kiln_model::config::TokenIds::One);
            config.pad_token_id = tk.pad_id();
            config.tie_word_embeddings = true;
            let model = Llama::init(&config, a.seed, &default_device())?;
            ModelDir::save(&model, &tk, &a.out)
                .with_context(|| format!("writing {}", a.out.display()))?;
            println!(
                "wrote {} ({} parameters)",
                a.out.display(),
                config.num_params()
            );
            Ok(())
        }
        ModelCmd::Info { model, json } => {
            let cfg = LlamaConfig::load(&model.join("config.json"))
                .with_context(|| format!("reading {}", model.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"config": serde_json::from_str::<serde_json::Value>(&cfg.to_json())?, "num_params": cfg.num_params()})
                );
            } else {
                println!(
                    "{}: {} layers, d={}, heads {}/{} (q/kv), ffn {}, vocab {}, context {}, {} parameters",
                    model.display(), cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads(),
                    cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.num_params()
                );
            }
            Ok(())
        }
    }
}
