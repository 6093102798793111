//! Kiln's generation engine: batched, KV-cached sampling from a [`Llama`]. Token ids in, token
//! ids out; it knows nothing of text.
//!
//! Prompts of different lengths are left-padded into one batch; each row's positions count only
//! its real tokens and no query attends to padding, so a batched row decodes exactly as it would
//! alone. The log-probability of every sampled token under the unmodified model distribution
//! (temperature 1, no filtering) is returned too: PPO needs it as the "old" policy.

mod sampler;

use burn::tensor::{Device, Tensor};
use kiln_model::{burn, ForwardInput, KvCache, Llama, ModelError};
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use sampler::{log_softmax_at, sample, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(
        "empty prompt at index {0}: a prompt needs at least one token (the BOS token, for example)"
    )]
    EmptyPrompt(usize),
    #[error("prompt of {prompt} tokens plus {new} new tokens exceeds the model's context of {max} (max_position_embeddings); shorten the prompt or lower --max-new-tokens")]
    TooLong {
        prompt: usize,
        new: usize,
        max: usize,
    },
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

/// What one prompt produced.
#[derive(Debug, Clone)]
pub struct Completion {
    /// New tokens, the stop token included when one ended the row.
    pub tokens: Vec<u32>,
    /// log p(token) under the model's raw distribution at each new token.
    pub logprobs: Vec<f32>,
    pub finish: Finish,
}

/// Logits of the last position of each row, `(B, V)`, on the host.
fn last_logits(logits: Tensor<3>) -> Vec<Vec<f32>> {
    let [b, t, v] = logits.dims();
    let last = logits.slice([0..b, t - 1..t, 0..v]).reshape([b, v]);
    let flat = last.try_into_vec_as::<f32>().expect("f32 tensor");
    flat.chunks(v).map(|c| c.to_vec()).collect()
}

/// Generates continuations of `prompts` in one batch. `on_token(row, token)` is called for every
/// new token as soon as it is sampled (for streaming).
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Completion>, EngineError> {
    // A reparameterized prefix is evaluated once here, not at every decoding step.
    let folded;
    let model = match &model.prefix {
        Some(p) if p.encoder.is_some() => {
            let mut m = model.clone();
            m.prefix = Some(p.folded());
            folded = m;
            &folded
        }
        _ => model,
    };
    let device: Device = model.device();
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(EngineError::EmptyPrompt(i));
        }
        model.check_tokens(p)?;
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max = model.config.max_position_embeddings;
    let capacity = longest + params.max_new_tokens;
    if longest + params.max_new_tokens > max {
        return Err(EngineError::TooLong {
            prompt: longest,
            new: params.max_new_tokens,
            max,
        });
    }
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut out: Vec<Completion> = (0..b)
        .map(|_| Completion {
            tokens: vec![],
            logprobs: vec![],
            finish: Finish::Length,
        })
        .collect();
    if params.max_new_tokens == 0 {
        return Ok(out);
    }

    // Prefill: left-pad to the longest prompt.
    let mut rows = Vec::with_capacity(b);
    let mut valid: Vec<Vec<bool>> = Vec::with_capacity(b);
    for p in prompts {
        let pad = longest - p.len();
        let mut row = vec![0u32; pad];
        row.extend(p);
        rows.push(row);
        let mut ok = vec![false; pad];
        ok.extend(std::iter::repeat_n(true, p.len()));
        valid.push(ok);
    }
    let mut cache = KvCache::new(&model.config, b, capacity, &device);
    // Sampling reads each row's last position only (the prompts are left-padded): the last
    // layer's output projection and feed-forward block and the head run there alone
    // ([`Llama::hidden_at_cached`]; at a PPO rollout's 64 prompts of 29 columns, the head at every
    // position was a third of the prefill's multiply-adds and a 30 MB tensor).
    let last: Vec<usize> = (0..b).map(|i| i * longest + longest - 1).collect();
    let hidden = model.hidden_at_cached(
        &ForwardInput::padded(&rows, &valid, &device),
        Some(&mut cache),
        &last,
    );
    let d = model.config.hidden_size;
    let mut logits = last_logits(model.head(hidden.reshape([b, 1, d])));
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut done = vec![false; b];
    let mut positions: Vec<usize> = prompts.iter().map(Vec::len).collect();

    for step in 0..params.max_new_tokens {
        let mut next = vec![0u32; b];
        for row in 0..b {
            if done[row] {
                continue;
            }
            let tok = sample(&logits[row], &history[row], params, &mut rng);
            let lp = log_softmax_at(&logits[row], tok);
            next[row] = tok;
            history[row].push(tok);
            out[row].tokens.push(tok);
            out[row].logprobs.push(lp);
            on_token(row, tok);
            if params.stop_tokens.contains(&tok) {
                done[row] = true;
                out[row].finish = Finish::Stop;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == params.max_new_tokens {
            break;
        }
        let input = ForwardInput::decode_step(&next, &positions, &valid, &device);
        logits = last_logits(model.forward(&input, Some(&mut cache)));
        for (row, ok) in valid.iter_mut().enumerate() {
            ok.push(!done[row]);
            positions[row] += 1;
        }
    }
    Ok(out)
}
