//! `kiln tokenizer train`: byte-level BPE with Kiln's chat special tokens.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_tokenizer::Tokenizer;

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer on text files.
    Train(TrainArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// Text files to learn merges from.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Directory to write tokenizer.json and tokenizer_config.json into.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train(a) => {
            if a.vocab_size < 256 + kiln_tokenizer::special_tokens().len() {
                bail!("--vocab-size {} is too small: byte-level BPE needs at least 256 byte tokens plus {} special tokens", a.vocab_size, kiln_tokenizer::special_tokens().len());
            }
            let start = std::time::Instant::now();
            let tk = Tokenizer::train(&a.input, a.vocab_size)?;
            tk.save(&a.out, None)
                .with_context(|| format!("writing the tokenizer to {}", a.out.display()))?;
            // Compression on the training text: bytes per token.
            let mut bytes = 0usize;
            let mut tokens = 0usize;
            for f in &a.input {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                bytes += text.len();
                tokens += tk.encode(&text)?.len();
            }
            let bpt = bytes as f64 / tokens.max(1) as f64;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"out": a.out, "vocab_size": tk.vocab_size(), "bytes_per_token": bpt, "seconds": start.elapsed().as_secs_f64()})
                );
            } else {
                println!(
                    "wrote {} (vocab {}, {:.2} bytes/token on the training text, {:.1}s)",
                    a.out.display(),
                    tk.vocab_size(),
                    bpt,
                    start.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
    }
}
