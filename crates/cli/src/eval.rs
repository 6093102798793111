//! `kiln eval loss`: mean next-token loss, perplexity and bits per byte of a model on text.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_data::read_documents;
use kiln_eval::evaluate_loss;
use kiln_model::{default_device, ModelDir};

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Next-token loss, perplexity and bits per byte on a text or JSONL file.
    Loss(LossArgs),
}

#[derive(Args)]
pub struct LossArgs {
    #[arg(long)]
    model: PathBuf,
    /// Text (documents separated by blank lines) or JSONL with a `text` key.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Loss(a) => {
            let device = default_device();
            let dir = ModelDir::load(&a.model, &device).with_context(|| format!("loading {}", a.model.display()))?;
            let mut docs = Vec::new();
            for path in &a.data {
                for doc in read_documents(path)? {
                    docs.push(doc?);
                }
            }
            if docs.is_empty() {
                bail!("no documents in {:?}", a.data);
            }
            let r = evaluate_loss(&dir.model, &dir.tokenizer, &docs, a.batch_size)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "loss {:.4}  perplexity {:.2}  bits/byte {:.4}  ({} tokens, {} bytes, {} documents)",
                    r.loss, r.perplexity, r.bits_per_byte, r.tokens, r.bytes, r.documents
                );
            }
            Ok(())
        }
    }
}
