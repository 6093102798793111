//! `kiln data`: synthesize the built-in world, tokenize a corpus into shards.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use kiln_tokenizer::Tokenizer;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Write the built-in world: corpus, SFT, preference and prompt sets, world.json.
    Synth(SynthArgs),
    /// Tokenize documents into a memory-mapped token shard (tokens.bin + tokens.json).
    Tokenize(TokenizeArgs),
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Multiplies the size of every file (1 = ~2 MB of prose, 6k SFT examples, 4k pairs).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Synth(a) => {
            let t = std::time::Instant::now();
            let r = kiln_data::world::synth(&a.out, a.seed, a.scale)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "wrote {} in {:.2}s: corpus {} bytes, sft {}+{} eval, prefs {}+{} eval, prompts {}+{} eval",
                    a.out.display(), t.elapsed().as_secs_f64(), r.corpus_bytes, r.sft, r.sft_eval, r.prefs, r.prefs_eval, r.prompts, r.prompts_eval
                );
                println!(
                    "preference labels: {:.1}% disagree with the gold reward; noise ceiling on prefs_eval accuracy: {:.1}%",
                    100.0 * r.label_flip_rate, 100.0 * r.noise_ceiling
                );
            }
            Ok(())
        }
        DataCmd::Tokenize(a) => {
            let tk = Tokenizer::load(&a.tokenizer)?;
            let meta = kiln_data::shards::write_shard(
                &a.data,
                &a.out,
                tk.vocab_size(),
                tk.bos_id(),
                tk.eos_id(),
                |t| tk.encode(t).map_err(|e| e.to_string()),
            )?;
            if a.json {
                println!("{}", serde_json::to_string(&meta)?);
            } else {
                println!(
                    "wrote {}: {} tokens from {} documents ({:.2} bytes/token)",
                    a.out.display(),
                    meta.num_tokens,
                    meta.num_documents,
                    meta.num_bytes as f64 / meta.num_tokens.max(1) as f64
                );
            }
            Ok(())
        }
    }
}
