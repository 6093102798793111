//! The Llama-family causal language model (`LlamaForCausalLM`): token embedding, a stack of
//! decoder blocks, a final RMSNorm and the language-model head (tied to the embedding or not).
//!
//! `forward` takes token ids, their positions and an additive attention mask, so one code path
//! serves training (causal + padding mask), batched left-padded generation, and incremental
//! decoding with a [`KvCache`]. Later stages put their heads on [`Llama::hidden`].

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::cache::KvCache;
use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::layers::{index_tensor, init_layer, rows_at, DecoderLayer, LayerCtx, RmsNorm, Rope};
use crate::peft::{PeftConfig, PrefixTuning};

/// Value added to attention scores a query must not see. Finite, so that a row with every key
/// masked (a left-padding query) gives a uniform distribution instead of NaN.
pub const MASKED: f32 = -1e30;

#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>, // (vocab, d)
}

/// The decoder body, `model.*` in a checkpoint.
#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct Llama {
    pub model: LlamaModel,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Trained key/value prefixes (prefix tuning), seen by every layer.
    pub prefix: Option<PrefixTuning>,
    #[module(skip)]
    pub config: LlamaConfig,
    /// Set when PEFT modules were added: how, and the base model directory they apply to.
    #[module(skip)]
    pub peft: Option<PeftInfo>,
}

/// The PEFT set-up of a model, saved in its adapter directory.
#[derive(Debug, Clone)]
pub struct PeftInfo {
    pub config: PeftConfig,
    /// The base model directory (`base_model_name_or_path` of the adapter).
    pub base: std::path::PathBuf,
}

/// Inputs of one forward pass over `(B, T)` tokens.
#[derive(Debug, Clone)]
pub struct ForwardInput {
    pub tokens: Tensor<2, Int>,    // (B, T)
    pub positions: Tensor<2, Int>, // (B, T)
    pub mask: Tensor<4>,           // (B, 1, T, S), additive
    /// Whether PEFT modules take part; off gives the base model (PPO's reference with LoRA).
    pub peft: bool,
}

impl ForwardInput {
    /// A batch of equal-length sequences, no padding: positions 0..T, causal mask.
    pub fn causal(tokens: &[Vec<u32>], device: &Device) -> Self {
        let valid: Vec<Vec<bool>> = tokens.iter().map(|t| vec![true; t.len()]).collect();
        Self::padded(tokens, &valid, device)
    }

    /// A batch whose rows may hold padding anywhere (`valid[b][t] == false`): each real token's
    /// position counts only real tokens before it (HF's `cumsum(mask) - 1`), and no query sees
    /// a padding key or a future one.
    pub fn padded(tokens: &[Vec<u32>], valid: &[Vec<bool>], device: &Device) -> Self {
        let b = tokens.len();
        let t = tokens.first().map_or(0, |r| r.len());
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        let mut mask = vec![MASKED; b * t * t];
        for (row, (toks, ok)) in tokens.iter().zip(valid).enumerate() {
            assert_eq!(
                toks.len(),
                t,
                "rows of a batch must have equal length (pad them)"
            );
            let mut p = 0i64;
            for (j, (&tok, &v)) in toks.iter().zip(ok).enumerate() {
                ids.push(tok as i64);
                pos.push(if v { p } else { 0 });
                if v {
                    p += 1;
                }
                for k in 0..=j {
                    if ok[k] {
                        mask[row * t * t + j * t + k] = 0.0;
                    }
                }
            }
        }
        ForwardInput {
            tokens: Tensor::from_data(TensorData::new(ids, [b, t]), device),
            positions: Tensor::from_data(TensorData::new(pos, [b, t]), device),
            mask: Tensor::from_data(TensorData::new(mask, [b, 1, t, t]), device),
            peft: true,
        }
    }

    /// The same input with PEFT modules switched off: the base model's forward pass.
    pub fn base(mut self) -> Self {
        self.peft = false;
        self
    }

    /// One decoding step over a cache holding `cached_valid[b].len()` positions: `tokens[b]`
    /// sits at `positions[b]`; it sees every valid cached key and itself.
    pub fn decode_step(
        tokens: &[u32],
        positions: &[usize],
        cached_valid: &[Vec<bool>],
        device: &Device,
    ) -> Self {
        let b = tokens.len();
        let s = cached_valid.first().map_or(0, |r| r.len()) + 1;
        let mut mask = vec![MASKED; b * s];
        for (row, ok) in cached_valid.iter().enumerate() {
            for (k, &v) in ok.iter().enumerate() {
                if v {
                    mask[row * s + k] = 0.0;
                }
            }
            mask[row * s + s - 1] = 0.0;
        }
        ForwardInput {
            tokens: Tensor::from_data(
                TensorData::new(tokens.iter().map(|&x| x as i64).collect::<Vec<_>>(), [b, 1]),
                device,
            ),
            positions: Tensor::from_data(
                TensorData::new(
                    positions.iter().map(|&x| x as i64).collect::<Vec<_>>(),
                    [b, 1],
                ),
                device,
            ),
            mask: Tensor::from_data(TensorData::new(mask, [b, 1, 1, s]), device),
            peft: true,
        }
    }
}

/// A padded batch with its padding taken out: the valid tokens of each row become one segment,
/// and segments are packed first-fit-decreasing into fewer rows of one width, each segment with
/// its own positions (from 0) and a causal mask that stays inside it. A forward pass over
/// `input` computes what [`ForwardInput::padded`] would at every valid token, in fewer token
/// slots when the rows' lengths differ (PPO's left-padded prompts: 13–29 tokens against a width
/// of 29 on the built-in world). [`Packing::select`] reads the hidden states back by the padded
/// layout's (row, column).
pub struct Packing {
    pub input: ForwardInput,
    /// For each row and column of the padded batch (row-major), the flat index
    /// `packed_row * width + slot` of its token. A padding column points at the row's latest
    /// valid token before it (its first valid token for leading padding), so that reading it
    /// gives a finite value, as the padded pass does; such values only ever stand at positions
    /// a loss masks out.
    index: Vec<usize>,
    cols: usize,
}

impl Packing {
    /// Packs `tokens` (rows of one length; `valid[b][t]` marks real tokens). `slot_cost(w)` is
    /// the relative cost of one token slot in a row of width `w` (linear layers plus attention);
    /// the width, between the longest row and four times it, minimises `rows · w · slot_cost(w)`
    /// (ties: the narrowest).
    pub fn new(
        tokens: &[Vec<u32>],
        valid: &[Vec<bool>],
        slot_cost: impl Fn(usize) -> f64,
        device: &Device,
    ) -> Self {
        let b = tokens.len();
        let cols = tokens.first().map_or(0, |r| r.len());
        let lens: Vec<usize> = valid
            .iter()
            .map(|v| v.iter().filter(|&&x| x).count().max(1))
            .collect();
        let longest = lens.iter().copied().max().unwrap_or(1);
        let mut order: Vec<usize> = (0..b).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(lens[i])); // stable: ties keep row order
        let pack = |width: usize| {
            // (remaining room, segments) per packed row
            let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
            for &i in &order {
                match bins.iter_mut().find(|(room, _)| *room >= lens[i]) {
                    Some((room, segs)) => {
                        *room -= lens[i];
                        segs.push(i);
                    }
                    None => bins.push((width - lens[i], vec![i])),
                }
            }
            bins
        };
        // Every width from the longest row to four times it (in at most ~200 steps): widths
        // that are multiples of the longest row pack badly when lengths are close (PPO's rows
        // of 45–61 tokens need a width near 106 to go two to a row).
        let step = (longest / 64).max(1);
        let (width, bins) = (longest..=4 * longest)
            .step_by(step)
            .map(|w| (w, pack(w)))
            .min_by(|(wa, a), (wb, b)| {
                let ca = (a.len() * wa) as f64 * slot_cost(*wa);
                let cb = (b.len() * wb) as f64 * slot_cost(*wb);
                ca.total_cmp(&cb)
            })
            .expect("at least one candidate width");
        let n = bins.len();
        let mut ids = vec![0i64; n * width];
        let mut pos = vec![0i64; n * width];
        let mut mask = vec![MASKED; n * width * width];
        let mut index = vec![0usize; b * cols];
        for (row, (_, segs)) in bins.iter().enumerate() {
            let mut start = 0;
            for &i in segs {
                let base = row * width;
                let mut slot = start;
                for (t, (&tok, &ok)) in tokens[i].iter().zip(&valid[i]).enumerate() {
                    if ok {
                        ids[base + slot] = tok as i64;
                        pos[base + slot] = (slot - start) as i64;
                        let m = &mut mask[(base + slot) * width..(base + slot + 1) * width];
                        m[start..=slot].iter_mut().for_each(|x| *x = 0.0);
                        index[i * cols + t] = base + slot;
                        slot += 1;
                    } else {
                        // the latest valid token before t, else the segment's first slot
                        index[i * cols + t] = base + slot.saturating_sub(1).max(start);
                    }
                }
                if slot == start {
                    // no valid token at all: one slot that sees only itself
                    mask[(base + slot) * width + slot] = 0.0;
                    slot += 1;
                }
                start = slot;
            }
        }
        Packing {
            input: ForwardInput {
                tokens: Tensor::from_data(TensorData::new(ids, [n, width]), device),
                positions: Tensor::from_data(TensorData::new(pos, [n, width]), device),
                mask: Tensor::from_data(TensorData::new(mask, [n, 1, width, width]), device),
                peft: true,
            },
            index,
            cols,
        }
    }

    /// Packed rows and their width.
    pub fn shape(&self) -> [usize; 2] {
        self.input.tokens.dims()
    }

    /// Where padded row `row`'s column `col` sits in the packed pass: `packed_row * width + slot`.
    pub fn index(&self, row: usize, col: usize) -> usize {
        assert!(
            col < self.cols,
            "column {col} of rows of {} columns",
            self.cols
        );
        self.index[row * self.cols + col]
    }

    /// Hidden states `(N, d)` at the flat packed indices `at`, from the packed pass's
    /// `(rows, width, d)`.
    pub fn gather(&self, hidden: Tensor<3>, at: &[usize]) -> Tensor<2> {
        let d = hidden.dims()[2];
        let idx = index_tensor(at, &hidden.device());
        rows_at(hidden, idx).reshape([at.len(), d])
    }

    /// Hidden states `(B, R, d)` of columns `range` of every padded row.
    pub fn select(&self, hidden: Tensor<3>, range: std::ops::Range<usize>) -> Tensor<3> {
        let d = hidden.dims()[2];
        let (b, r) = (self.rows(), range.len());
        self.gather(hidden, &self.columns(range)).reshape([b, r, d])
    }

    /// The flat packed indices of columns `range` of every padded row, row-major (`B·R`): for
    /// [`Llama::hidden_at`].
    pub fn columns(&self, range: std::ops::Range<usize>) -> Vec<usize> {
        (0..self.rows())
            .flat_map(|i| range.clone().map(move |t| (i, t)))
            .map(|(i, t)| self.index(i, t))
            .collect()
    }

    /// Rows of the padded batch.
    pub fn rows(&self) -> usize {
        self.index.len() / self.cols.max(1)
    }
}

impl Llama {
    /// An untrained model: weights ~ N(0, initializer_range), residual output projections
    /// scaled by 1/sqrt(2 * layers) (GPT-2), norms at 1. Deterministic for a seed.
    pub fn init(config: &LlamaConfig, seed: u64, device: &Device) -> Result<Self, ModelError> {
        config.validate()?;
        let std = config.initializer_range;
        let resid_std = std / (2.0 * config.num_hidden_layers as f64).sqrt();
        let mut rng = crate::rng::Normal::new(seed);
        let mut init = |name: String, shape: Vec<usize>| {
            let s = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                resid_std
            } else {
                std
            };
            let n = shape.iter().product();
            Tensor::<2>::from_data(
                TensorData::new(rng.sample_vec(n, s as f32), [shape[0], shape[1]]),
                device,
            )
        };
        let (v, d) = (config.vocab_size, config.hidden_size);
        let embed = init("model.embed_tokens.weight".into(), vec![v, d]);
        let layers = (0..config.num_hidden_layers)
            .map(|i| init_layer(config, i, &mut init, device))
            .collect();
        let lm_head = (!config.tie_word_embeddings)
            .then(|| crate::layers::linear(init("lm_head.weight".into(), vec![d, v]), None));
        Ok(Llama {
            model: LlamaModel {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(embed),
                },
                layers,
                norm: RmsNorm::new(d, config.rms_norm_eps, device),
            },
            lm_head,
            prefix: None,
            config: config.clone(),
            peft: None,
        })
    }

    /// Whether LoRA, adapters or a prefix were added (so it saves as an adapter directory).
    pub fn has_peft_modules(&self) -> bool {
        self.prefix.is_some()
            || self.model.layers.iter().any(|l| {
                l.attn_adapter.is_some()
                    || l.mlp_adapter.is_some()
                    || l.projections().iter().any(|(_, p)| p.lora.is_some())
            })
    }

    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// The padded batch `tokens` packed without its padding ([`Packing`]), its width chosen
    /// with this model's cost of a token slot: the linear layers' multiply-adds per token plus
    /// attention's, `2 · w · heads · head_dim` per layer in a row of width `w`.
    pub fn packing(&self, tokens: &[Vec<u32>], valid: &[Vec<bool>]) -> Packing {
        let c = &self.config;
        let (d, hd) = (c.hidden_size, c.head_dim());
        let (q, kv) = (c.num_attention_heads * hd, c.kv_heads() * hd);
        let linear = (2 * d * q + 2 * d * kv + 3 * d * c.intermediate_size) as f64;
        Packing::new(
            tokens,
            valid,
            |w| 1.0 + (2 * w * q) as f64 / linear,
            &self.device(),
        )
    }

    /// Final hidden states after the last norm, `(B, T, d)`.
    pub fn hidden(&self, input: &ForwardInput, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.model.norm.forward(self.layers(input, cache, None))
    }

    /// Final hidden states after the last norm at the flat `(B·T)` positions `at` only,
    /// `(N, d)`: what `hidden(input, None)` reshaped to `(B·T, d)` holds in those rows, with
    /// the last layer's output projection and feed-forward block run on those rows alone
    /// ([`DecoderLayer::forward_at`]), as nothing reads the others. Positions may repeat.
    pub fn hidden_at(&self, input: &ForwardInput, at: &[usize]) -> Tensor<2> {
        self.hidden_at_cached(input, None, at)
    }

    /// [`Self::hidden_at`], filling `cache` with every position's keys and values as
    /// [`Self::hidden`] does: a prefill whose sampling reads only each row's last position.
    pub fn hidden_at_cached(
        &self,
        input: &ForwardInput,
        cache: Option<&mut KvCache>,
        at: &[usize],
    ) -> Tensor<2> {
        let d = self.config.hidden_size;
        let h = self.layers(input, cache, Some(index_tensor(at, &self.device())));
        self.model.norm.forward(h).reshape([at.len(), d])
    }

    /// The decoder blocks before the final norm; with `at`, the last block runs its output
    /// projection and feed-forward block at those flat positions only (`(1, N, d)`).
    fn layers(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
        at: Option<Tensor<1, Int>>,
    ) -> Tensor<3> {
        let device = self.device();
        let ctx = LayerCtx {
            rope: Rope::new(
                &input.positions,
                self.config.head_dim(),
                self.config.rope_theta(),
                &device,
            ),
            mask: input.mask.clone(),
            peft: input.peft,
        };
        let prefix = match &self.prefix {
            Some(p) if input.peft => Some(p.layer_kv()),
            _ => None,
        };
        let mut x = embedding(self.model.embed_tokens.weight.val(), input.tokens.clone()); // (B, T, d)
        let last = self.model.layers.len().saturating_sub(1);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let kv = prefix.as_ref().map(|p| &p[i]);
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = match &at {
                Some(at) if i == last => layer.forward_at(x, &ctx, kv, layer_cache, at.clone()),
                _ => layer.forward(x, &ctx, kv, layer_cache),
            };
        }
        match at {
            // no layers at all: the embeddings at those positions
            Some(at) if self.model.layers.is_empty() => rows_at(x, at),
            _ => x,
        }
    }

    /// Language-model logits for hidden states, `(B, T, vocab)`.
    pub fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => crate::fused::linear(
                hidden,
                head.weight.val(),
                head.bias.as_ref().map(|b| b.val()),
            ),
            None => crate::fused::matmul(hidden, self.model.embed_tokens.weight.val().transpose()),
        }
    }

    /// The language-model head as a `(d, V)` matrix (a tied head: the embedding's transposed
    /// view), whether it has a bias, and whether it takes gradients (read from its parameter).
    fn head_weight(&self) -> (Tensor<2>, bool, bool) {
        match &self.lm_head {
            Some(head) => {
                let w = head.weight.val();
                let trains = w.is_require_grad();
                (w, head.bias.is_some(), trains)
            }
            None => {
                let e = self.model.embed_tokens.weight.val();
                let trains = e.is_require_grad();
                (e.transpose(), false, trains)
            }
        }
    }

    /// `token_logprobs(head(hidden), targets)` from the whole `(N, V)` logits.
    fn whole_logprobs(&self, hidden: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        let [n, d] = hidden.dims();
        token_logprobs(
            self.head(hidden.reshape([1, n, d])),
            targets.reshape([1, n]),
        )
        .reshape([n])
    }

    /// Log-probabilities `(N)` of `targets (N)` under the language-model head at hidden states
    /// `(N, d)`: `token_logprobs(head(hidden), targets)`. Where those `(N, V)` logits would
    /// take more than [`crate::fused::logits_budget`] (512 MiB: a 32k-token vocabulary at 4,096
    /// tokens), the head and the log-softmax run chunk by chunk and the logits are never held
    /// whole ([`crate::fused::head_logprobs`]; its backward pass recomputes each chunk's).
    pub fn target_logprobs(&self, hidden: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        if self.chunks_logits(hidden.dims()[0]) {
            return crate::fused::head_logprobs(hidden, self.head_weight().0, targets);
        }
        self.whole_logprobs(hidden, targets)
    }

    /// Whether the head's logits for `rows` hidden states run chunk by chunk, never held whole
    /// ([`Self::target_logprobs`], [`Self::target_logprobs_entropy`]): past
    /// [`crate::fused::logits_budget`], with the fused kernels, on a head without a bias.
    pub fn chunks_logits(&self, rows: usize) -> bool {
        let (w, biased, _) = self.head_weight();
        let logits_bytes = rows * w.dims()[1] * std::mem::size_of::<f32>();
        crate::fused::enabled() && !biased && logits_bytes > crate::fused::logits_budget()
    }

    /// [`Self::target_logprobs`] and the entropy of each row's next-token distribution, `(N)`
    /// each, both differentiable (PPO's policy: its ratio and its entropy bonus). Where
    /// [`Self::chunks_logits`], from [`crate::fused::head_logprobs_entropy`]'s chunks; else
    /// from the whole logits.
    pub fn target_logprobs_entropy(
        &self,
        hidden: Tensor<2>,
        targets: Tensor<1, Int>,
    ) -> (Tensor<1>, Tensor<1>) {
        let [n, d] = hidden.dims();
        if self.chunks_logits(n) {
            return crate::fused::head_logprobs_entropy(hidden, self.head_weight().0, targets);
        }
        let logits = self
            .head(hidden.reshape([1, n, d]))
            .reshape([n, self.config.vocab_size]);
        let ent = crate::fused::entropy_reference(logits.clone());
        (crate::fused::token_logprobs(logits, targets), ent)
    }

    /// The mean negative log-likelihood of `targets (N)` under the language-model head at hidden
    /// states `(N, d)`, `(1)`: `-mean(token_logprobs(head(hidden), targets))`, as HF's
    /// cross-entropy loss. The head, log-softmax and the gradients run chunk by chunk in one pass
    /// ([`crate::fused::head_logprob_sum`]), so the `(N, V)` logits are never held whole and
    /// no product runs twice: at a 32k-token vocabulary and `tiny`'s 4,096-token step, 166-235 MB
    /// less peak memory at the same speed (docs/performance.md, "A tenth session").
    /// `KILN_CHUNKED_HEAD=0` holds the whole logits instead (for comparisons).
    pub fn mean_nll(&self, hidden: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
        let n = hidden.dims()[0];
        let (w, biased, train_head) = self.head_weight();
        if crate::fused::chunked_head() && !biased {
            let coef = Tensor::full([n], -1.0 / n.max(1) as f64, &hidden.device());
            return crate::fused::head_logprob_sum(hidden, w, targets, coef, train_head);
        }
        self.whole_logprobs(hidden, targets).neg().sum() / n.max(1) as f64
    }

    /// Logits for every position, `(B, T, vocab)`.
    pub fn forward(&self, input: &ForwardInput, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.head(self.hidden(input, cache))
    }

    /// Checks token ids against the vocabulary and the context before a forward pass.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.len() > self.config.max_position_embeddings {
            return Err(ModelError::TooLong {
                len: tokens.len(),
                max: self.config.max_position_embeddings,
            });
        }
        match tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            Some(&id) => Err(ModelError::TokenOutOfRange {
                id,
                vocab: self.config.vocab_size,
            }),
            None => Ok(()),
        }
    }
}

/// Log-probability of each target token under `logits`: `(B, T, V)`, `(B, T)` -> `(B, T)`.
pub fn token_logprobs(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [b, t, v] = logits.dims();
    crate::fused::token_logprobs(logits.reshape([b * t, v]), targets.reshape([b * t]))
        .reshape([b, t])
}

/// Mean next-token cross-entropy over the positions where `weights` is 1, as HF's loss with
/// labels = -100 elsewhere. `logits[:, j]` predicts `targets[:, j]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>, weights: Tensor<2>) -> Tensor<1> {
    let nll = token_logprobs(logits, targets).neg() * weights.clone();
    nll.sum() / weights.sum().clamp_min(1.0)
}
