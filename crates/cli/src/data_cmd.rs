//! `kiln data`: synthesize the built-in world, tokenize a corpus into shards, inspect files.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use kiln_data::inspect::{inspect_file, Item, TokenCounter};
use kiln_tokenizer::chat::Message;
use kiln_tokenizer::Tokenizer;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Write the built-in world: corpus, SFT, preference and prompt sets, world.json.
    Synth(SynthArgs),
    /// Tokenize documents into a memory-mapped token shard (tokens.bin + tokens.json).
    Tokenize(TokenizeArgs),
    /// Show what data files hold: detected format, rows by kind, bad rows, token statistics.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct InspectArgs {
    /// Text, JSONL or Parquet files (folders: every data file in them).
    #[arg(required = true, num_args = 1..)]
    paths: Vec<PathBuf>,
    /// A tokenizer (tokenizer.json or a model directory) for token statistics; conversations
    /// are rendered with its chat template.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long)]
    json: bool,
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
    /// Leave malformed documents out (counted) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Each plain text file is one document (default: split on blank lines).
    #[arg(long)]
    doc_per_file: bool,
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
                kiln_data::shards::ReadOptions {
                    skip_bad: a.skip_bad,
                    whole_files: a.doc_per_file,
                },
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
                if meta.skipped > 0 {
                    println!("skipped {} malformed documents:", meta.skipped);
                    for e in &meta.skipped_examples {
                        println!("  {e}");
                    }
                }
            }
            Ok(())
        }
        DataCmd::Inspect(a) => inspect(a),
    }
}

fn inspect(a: InspectArgs) -> Result<()> {
    let tk = a.tokenizer.as_deref().map(Tokenizer::load).transpose()?;
    let mut count = |item: &Item| -> Result<usize, String> {
        let tk = tk.as_ref().expect("only called with a tokenizer");
        let msgs = |turns: &[kiln_data::chat::Turn]| -> Vec<Message> {
            turns
                .iter()
                .map(|t| Message::new(&t.role, &t.content))
                .collect()
        };
        let n = match item {
            Item::Document(text) => tk.encode(text).map(|ids| ids.len()),
            Item::Conversation(turns) => tk.encode_chat(&msgs(turns)).map(|c| c.ids.len()),
            Item::Prompt(turns) => tk.encode_chat_prompt(&msgs(turns)).map(|ids| ids.len()),
            Item::Pair(p) => {
                let mut m = msgs(&p.prompt);
                m.push(Message::new("assistant", &p.chosen));
                tk.encode_chat(&m).map(|c| c.ids.len())
            }
        };
        n.map_err(|e| e.to_string())
    };
    let mut reports = Vec::new();
    for p in &a.paths {
        for file in kiln_data::shards::expand(p)? {
            let counter: Option<TokenCounter> = if tk.is_some() { Some(&mut count) } else { None };
            reports.push(inspect_file(&file, counter)?);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    for r in &reports {
        println!("{}: {}", r.path.display(), r.format);
        println!("  rows: {}", r.rows);
        for (kind, n) in &r.kinds {
            println!("  {kind}: {n}");
        }
        if let Some(t) = &r.tokens {
            println!(
                "  tokens: {} total, {:.1} mean, p50 {}, p95 {}, max {} per row",
                t.total, t.mean, t.p50, t.p95, t.max
            );
        }
        if r.bad_rows > 0 {
            println!("  bad rows: {} (first {} shown)", r.bad_rows, r.bad.len());
            for b in &r.bad {
                println!("    {b}");
            }
        }
    }
    Ok(())
}
