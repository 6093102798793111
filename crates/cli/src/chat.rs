//! `kiln chat`: an interactive conversation in the terminal. Each turn is rendered with the
//! model's chat template, the answer streams as it is generated, and the history is kept (the
//! oldest turns are dropped, with a notice, when it outgrows the context).
//!
//! Lines starting with `/` are commands: `/reset` clears the history, `/system TEXT` sets the
//! system message, `/quit` (or end of input) leaves. With piped input (not a terminal), each
//! answer is printed as one JSON line `{"user": ..., "assistant": ...}` instead of streaming.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_engine::{generate, SamplingParams};
use kiln_model::adapter_dir::{load_adapter, load_any};
use kiln_model::peft::into_base;
use kiln_model::{default_device, ModelDir};
use kiln_tokenizer::chat::Message;
use kiln_tokenizer::StreamDecoder;

#[derive(Args)]
pub struct ChatArgs {
    /// A model directory (or an adapter directory, whose base it names).
    #[arg(long)]
    model: PathBuf,
    /// An adapter directory to apply on top of --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A system message to start with.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Precision of the linear layers' products: f32, or bf16 (each weight read as bf16, half the
    /// bytes a decoding step streams; f32 on a CPU without AVX512-BF16).
    #[arg(long, default_value = "f32")]
    precision: kiln_model::fused::MatmulPrecision,
}

pub fn run(a: ChatArgs) -> Result<()> {
    kiln_train::trainer::set_precision(a.precision);
    let device = default_device();
    let mut dir = ModelDir::load(&a.model, &device)
        .with_context(|| format!("loading --model {}", a.model.display()))?;
    if let Some(ad) = &a.adapter {
        let base = into_base(load_any(&a.model, &device)?)?;
        dir.model = load_adapter(base, &a.model, ad)
            .with_context(|| format!("applying --adapter {}", ad.display()))?;
    }
    let tk = &dir.tokenizer;
    let ctx = dir.model.config.max_position_embeddings;
    let mut history: Vec<Message> = Vec::new();
    let mut system = a.system.clone();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "kiln chat: {} ({} tokens of context). /reset, /system TEXT, /quit",
            a.model.display(),
            ctx
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match line.split_once(' ').map_or((line, ""), |(c, r)| (c, r)) {
            ("/quit", _) | ("/exit", _) => break,
            ("/reset", _) => {
                history.clear();
                eprintln!("(history cleared)");
                continue;
            }
            ("/system", rest) => {
                system = (!rest.trim().is_empty()).then(|| rest.trim().to_string());
                eprintln!(
                    "(system message {})",
                    if system.is_some() { "set" } else { "cleared" }
                );
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        // Drop the oldest exchanges until the prompt leaves room for an answer.
        let prompt = loop {
            let mut msgs = Vec::new();
            if let Some(s) = &system {
                msgs.push(Message::new("system", s));
            }
            msgs.extend(history.iter().cloned());
            let ids = tk.encode_chat_prompt(&msgs)?;
            if ids.len() + a.max_new_tokens.min(ctx / 2) <= ctx || history.len() <= 1 {
                break ids;
            }
            history.drain(..2.min(history.len() - 1));
            eprintln!("(history too long for the context: dropped the oldest exchange)");
        };
        if prompt.len() >= ctx {
            eprintln!("(that message alone fills the context of {ctx} tokens; try a shorter one)");
            history.pop();
            continue;
        }
        let params = SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            max_new_tokens: a.max_new_tokens.min(ctx - prompt.len()),
            stop_tokens: tk.eos_id().into_iter().collect(),
            seed: a.seed.wrapping_add(turn),
        };
        turn += 1;
        let mut stream = StreamDecoder::new();
        let out = generate(&dir.model, &[prompt], &params, |_, tok| {
            if !interactive || Some(tok) == tk.eos_id() {
                return;
            }
            if let Ok(piece) = stream.push(tk, tok) {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
        })?;
        let answer = tk.decode(&out[0].tokens, true)?;
        if interactive {
            println!();
        } else {
            println!(
                "{}",
                serde_json::json!({"user": line, "assistant": answer.trim()})
            );
        }
        history.push(Message::new("assistant", answer.trim()));
    }
    Ok(())
}
