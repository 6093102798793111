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
use crate::layers::{init_layer, DecoderLayer, LayerCtx, RmsNorm, Rope};
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

    /// Final hidden states after the last norm, `(B, T, d)`.
    pub fn hidden(&self, input: &ForwardInput, mut cache: Option<&mut KvCache>) -> Tensor<3> {
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
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let kv = prefix.as_ref().map(|p| &p[i]);
            x = layer.forward(x, &ctx, kv, layer_cache);
        }
        self.model.norm.forward(x)
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
