//! `kiln generate`: sample a continuation of a prompt with the KV-cache engine, streaming text.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kiln_engine::{generate, Finish, SamplingParams};
use kiln_model::fused::MatmulPrecision;
use kiln_model::{default_device, ModelDir};
use kiln_tokenizer::StreamDecoder;

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Extra stop tokens (strings that are single tokens, e.g. "<|user|>"); EOS always stops.
    #[arg(long)]
    stop: Vec<String>,
    /// Do not prepend the BOS token.
    #[arg(long)]
    no_bos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Precision of the linear layers' products: f32, or bf16 (each weight read as bf16, half the
    /// bytes a decoding step streams; f32 on a CPU without AVX512-BF16). See docs/performance.md.
    #[arg(long, default_value = "f32")]
    precision: MatmulPrecision,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    kiln_train::trainer::set_precision(a.precision);
    let device = default_device();
    let dir = ModelDir::load(&a.model, &device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let tk = &dir.tokenizer;
    let prompt = if a.no_bos {
        tk.encode(&a.prompt)?
    } else {
        tk.encode_with_bos(&a.prompt)?
    };
    let mut stop: Vec<u32> = tk.eos_id().into_iter().collect();
    for s in &a.stop {
        stop.push(
            tk.token_id(s)
                .with_context(|| format!("--stop {s:?} is not a single token of this tokenizer"))?,
        );
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        max_new_tokens: a.max_new_tokens,
        stop_tokens: stop,
        seed: a.seed,
    };
    let start = Instant::now();
    let mut stream = StreamDecoder::new();
    let mut stdout = std::io::stdout();
    if !a.json {
        print!("{}", a.prompt);
        stdout.flush().ok();
    }
    let json = a.json;
    let out = generate(
        &dir.model,
        std::slice::from_ref(&prompt),
        &params,
        |_, tok| {
            if !json {
                if let Ok(piece) = stream.push(tk, tok) {
                    print!("{piece}");
                    let _ = std::io::stdout().flush();
                }
            }
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let c = &out[0];
    let text = tk.decode(&c.tokens, true)?;
    let finish = if c.finish == Finish::Stop {
        "stop"
    } else {
        "length"
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "prompt": a.prompt, "completion": text, "prompt_tokens": prompt.len(), "new_tokens": c.tokens.len(),
                "finish": finish, "seconds": secs, "tok_s": c.tokens.len() as f64 / secs,
                "precision": kiln_model::fused::precision_in_effect().1.to_string(),
            })
        );
    } else {
        println!();
        eprintln!(
            "[{} tokens, {:.1} tok/s, finish: {finish}]",
            c.tokens.len(),
            c.tokens.len() as f64 / secs
        );
    }
    Ok(())
}
