//! Pre-training: next-token prediction on a tokenized corpus (Radford et al. 2018/2019).
//!
//! The token stream is split as nanoGPT splits it: the first `1 - val_fraction` for training,
//! the rest for validation. A training batch is `batch_size` windows of `seq_len + 1` tokens at
//! positions drawn from a generator seeded by (seed, step, micro-batch): the data position is
//! the step, so a resumed run reads exactly the batches an uninterrupted one would. Validation
//! uses fixed consecutive windows and reports loss, perplexity and bits per byte (comparable
//! across tokenizers).

use std::path::{Path, PathBuf};

use kiln_data::shards::{write_shard, ReadOptions, Shard, TOKENS_META};
use kiln_engine::{generate, SamplingParams};
use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_model::{ForwardInput, Llama};
use kiln_tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::perf::FlopCount;
use crate::trainer::{backward_halves, Stage, StageGrads};
use crate::{TrainConfig, TrainError};

/// Next-token cross-entropy over every position of `windows` (rows of `T + 1` tokens: the
/// inputs and their shifted targets): the mean over all `B · T` targets.
pub fn lm_loss(model: &Llama, windows: &[Vec<u32>]) -> Tensor<1> {
    let device = model.device();
    let b = windows.len();
    let t = windows.first().map_or(0, |w| w.len().saturating_sub(1));
    let inputs: Vec<Vec<u32>> = windows.iter().map(|w| w[..t].to_vec()).collect();
    let targets: Vec<i64> = windows
        .iter()
        .flat_map(|w| w[1..].iter().map(|&x| x as i64))
        .collect();
    let n = b * t;
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let hidden = model.hidden(&ForwardInput::causal(&inputs, &device), None);
    let d = model.config.hidden_size;
    model.mean_nll(hidden.reshape([n, d]), targets)
}

/// The gradients of [`lm_loss`]` · scale` and its value, from the two halves of `windows`
/// back-propagated side by side ([`backward_halves`]; each half's mean weighted by its share of
/// the rows); `None` for fewer than two windows. The pre-training step, and `kiln bench`'s.
pub fn lm_grads(
    model: &Llama,
    windows: &[Vec<u32>],
    scale: f64,
) -> Option<(Vec<GradientsParams>, f64)> {
    backward_halves(model, windows, <[_]>::len, lm_loss, scale)
}

pub struct Pretrain {
    shard: Shard,
    split: usize,
    seq_len: usize,
    batch: usize,
    seed: u64,
    eval_batches: usize,
    device: Device,
    /// UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte.
    token_bytes: Vec<usize>,
    tokenizer: Tokenizer,
    samples: usize,
    sample_tokens: usize,
}

/// Bytes of text each token id decodes to. Byte-level BPE maps every character of a token's
/// string to one byte; other tokenizers are measured by decoding.
pub fn token_bytes(tk: &Tokenizer) -> Vec<usize> {
    let n = tk.vocab_size();
    let specials: std::collections::HashSet<u32> = tk
        .inner
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    let byte_level = tk
        .inner
        .get_decoder()
        .is_some_and(|d| format!("{d:?}").contains("ByteLevel"));
    (0..n as u32)
        .map(|id| {
            if specials.contains(&id) {
                0
            } else if byte_level {
                tk.inner.id_to_token(id).map_or(0, |t| t.chars().count())
            } else {
                tk.decode(&[id], false).map_or(0, |s| s.len())
            }
        })
        .collect()
}

/// Tokenizes `inputs` into a shard in `dir` unless one made from the same inputs is there;
/// `opts.skip_bad` leaves malformed documents out (counted, with a warning) instead of stopping.
pub fn prepare_shard(
    inputs: &[PathBuf],
    tokenizer: &Tokenizer,
    dir: &Path,
    opts: ReadOptions,
) -> Result<Shard, TrainError> {
    if dir.join(TOKENS_META).exists() {
        if let Ok(shard) = Shard::open(dir) {
            if shard.meta.sources == inputs && shard.meta.vocab_size == tokenizer.vocab_size() {
                return Ok(shard);
            }
        }
    }
    let tk = tokenizer.clone();
    let meta = write_shard(
        inputs,
        dir,
        tokenizer.vocab_size(),
        tokenizer.bos_id(),
        tokenizer.eos_id(),
        opts,
        |t| tk.encode(t).map_err(|e| e.to_string()),
    )?;
    if meta.skipped > 0 {
        tracing::warn!(
            "skipped {} malformed documents; first: {}",
            meta.skipped,
            meta.skipped_examples[0]
        );
    }
    Ok(Shard::open(dir)?)
}

impl Pretrain {
    pub fn new(
        shard: Shard,
        tokenizer: &Tokenizer,
        config: &TrainConfig,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let seq_len = config.data.seq_len;
        let n = shard.len();
        let split = ((n as f64) * (1.0 - config.data.val_fraction)).round() as usize;
        if split < seq_len + 2 || n - split < seq_len + 2 {
            return Err(TrainError::Config(format!(
                "the corpus has {n} tokens: too few for data.seq_len = {seq_len} with val_fraction = {} (need more than {} on each side)",
                config.data.val_fraction,
                seq_len + 1
            )));
        }
        Ok(Pretrain {
            shard,
            split,
            seq_len,
            batch: config.data.batch_size,
            seed: config.seed,
            eval_batches: config.eval.batches,
            device: device.clone(),
            token_bytes: token_bytes(tokenizer),
            tokenizer: tokenizer.clone(),
            samples: config.eval.samples,
            sample_tokens: config.eval.sample_tokens,
        })
    }

    /// The training windows of micro-batch `micro` of step `step` (a deterministic function
    /// of them, for exact resume).
    fn windows(&self, step: usize, micro: usize) -> Vec<Vec<u32>> {
        let mut rng = StdRng::seed_from_u64(
            self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((step as u64) << 16) ^ micro as u64,
        );
        let max_start = self.split - self.seq_len - 1;
        (0..self.batch)
            .map(|_| {
                let s = rng.random_range(0..=max_start);
                self.shard.tokens(s, s + self.seq_len + 1)
            })
            .collect()
    }

    /// Validation windows: consecutive, non-overlapping, from the start of the held-out part.
    fn val_windows(&self) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        let mut start = self.split;
        while out.len() < self.eval_batches * self.batch && start + self.seq_len < self.shard.len()
        {
            out.push(self.shard.tokens(start, start + self.seq_len + 1));
            start += self.seq_len;
        }
        out
    }
}

impl Stage<Llama> for Pretrain {
    fn train_loss(
        &mut self,
        model: &Llama,
        step: usize,
        micro: usize,
    ) -> Result<(Tensor<1>, usize), TrainError> {
        let windows = self.windows(step, micro);
        let _ = &self.device;
        Ok((lm_loss(model, &windows), self.batch * self.seq_len))
    }

    fn train_grads(
        &mut self,
        model: &Llama,
        step: usize,
        micro: usize,
        scale: f64,
    ) -> Result<Option<StageGrads>, TrainError> {
        let windows = self.windows(step, micro);
        let tokens = self.batch * self.seq_len;
        Ok(lm_grads(model, &windows, scale).map(|g| StageGrads::of(g, tokens)))
    }

    fn flops(&mut self, count: &FlopCount, _step: usize, _micro: usize) -> Option<f64> {
        // Every position reads the vocabulary head.
        let rows = std::iter::repeat_n((self.seq_len, self.seq_len), self.batch);
        Some(count.rows(rows, count.vocab, true))
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>, TrainError> {
        let device = model.device();
        let windows = self.val_windows();
        let (mut nll, mut count, mut bytes) = (0.0f64, 0usize, 0usize);
        for chunk in windows.chunks(self.batch) {
            let (b, t) = (chunk.len(), self.seq_len);
            let inputs: Vec<Vec<u32>> = chunk.iter().map(|w| w[..t].to_vec()).collect();
            let targets: Vec<i64> = chunk
                .iter()
                .flat_map(|w| w[1..].iter().map(|&x| x as i64))
                .collect();
            // Through `target_logprobs`: chunk by chunk past the logits budget (no backward pass
            // here, so chunking costs nothing), the whole logits' values below it.
            let hidden = model.hidden(&ForwardInput::causal(&inputs, &device), None);
            let d = model.config.hidden_size;
            let lp = kiln_model::to_vec(model.target_logprobs(
                hidden.reshape([b * t, d]),
                Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [b * t]), &device),
            ));
            nll -= lp.iter().map(|&x| x as f64).sum::<f64>();
            count += lp.len();
            bytes += targets
                .iter()
                .map(|&id| self.token_bytes.get(id as usize).copied().unwrap_or(0))
                .sum::<usize>();
        }
        let loss = nll / count.max(1) as f64;
        Ok(vec![
            ("val_loss".into(), loss),
            ("val_ppl".into(), loss.exp()),
            (
                "val_bpb".into(),
                nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
            ),
        ])
    }

    fn samples(&mut self, model: &Llama) -> Result<Vec<String>, TrainError> {
        let mut out = Vec::new();
        let val = self.val_windows();
        let eos: Vec<u32> = self.tokenizer.eos_id().into_iter().collect();
        for (i, w) in val.iter().take(self.samples).enumerate() {
            let prompt = w[..8.min(w.len())].to_vec();
            let params = SamplingParams {
                temperature: 0.8,
                top_k: 40,
                max_new_tokens: self.sample_tokens,
                stop_tokens: eos.clone(),
                seed: i as u64,
                ..Default::default()
            };
            let c = generate(model, std::slice::from_ref(&prompt), &params, |_, _| {})?;
            let text = format!(
                "{}|{}",
                self.tokenizer.decode(&prompt, true)?,
                self.tokenizer.decode(&c[0].tokens, true)?
            );
            out.push(text);
        }
        Ok(out)
    }
}
