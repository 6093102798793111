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
    /// Greedy answers to the built-in world's prompts, scored by the gold reward.
    Gold(GoldArgs),
}

#[derive(Args)]
pub struct GoldArgs {
    #[arg(long)]
    model: PathBuf,
    /// Prompts (JSONL `prompt`/`messages`, or text one per line), e.g. prompts_eval.jsonl.
    #[arg(long, required = true, num_args = 1..)]
    prompts: Vec<PathBuf>,
    /// world.json; by default the one beside the prompts.
    #[arg(long)]
    world: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
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
            let dir = ModelDir::load(&a.model, &device)
                .with_context(|| format!("loading {}", a.model.display()))?;
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
        EvalCmd::Gold(a) => {
            let device = default_device();
            let dir = ModelDir::load(&a.model, &device)
                .with_context(|| format!("loading {}", a.model.display()))?;
            let world = crate::sft::find_world(a.world.as_deref(), &a.prompts)?.context(
                "no world.json beside the prompts: pass --world (written by `kiln data synth`)",
            )?;
            let (prompts, _) = kiln_data::chat::read_prompts(&a.prompts, false)?;
            let r = kiln_eval::gold_eval(
                &dir.model,
                &dir.tokenizer,
                &world,
                &prompts,
                a.max_new_tokens,
                a.batch_size,
            )?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "gold reward {:.3} ± {:.3} (95% CI) | exact match {:.1}% ± {:.1} | correct {:.1}% | polite {:.1}% | rude {:.1}% | {:.1} tokens/answer | n = {}",
                    r.gold_reward.mean, r.gold_reward.ci95, 100.0 * r.exact_match.mean, 100.0 * r.exact_match.ci95, 100.0 * r.correct.mean,
                    100.0 * r.polite, 100.0 * r.rude, r.mean_tokens, r.n
                );
                for (q, ans, g) in &r.samples {
                    println!("  {q} -> {ans}   [{g:+.2}]");
                }
            }
            Ok(())
        }
    }
}
