//! The layers of a Llama decoder, bottom-up: RMSNorm, rotary embeddings, attention, SwiGLU MLP,
//! decoder block. Field names are the Hugging Face names, so a parameter's module path *is* its
//! checkpoint key (`model.layers.0.self_attn.q_proj.weight`).
//!
//! Follows `transformers`' `modeling_llama.py`. Differences: burn's `Linear` stores its weight as
//! `[in, out]` (HF: `[out, in]`; the checkpoint code transposes), and the rotary embedding is
//! HF's half-rotation layout written here (burn-nn's `RotaryEncoding` rotates interleaved pairs).

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::cache::LayerCache;
use crate::config::LlamaConfig;
use crate::peft::{Adapter, Lora};

/// Root-mean-square layer norm (Zhang & Sennrich 2019) with a learned gain, as `LlamaRMSNorm`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, device: &Device) -> Self {
        RmsNorm {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::fused::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// cos and sin of the rotary angles for each position, `(B, 1, T, head_dim)`, computed the way
/// HF's `LlamaRotaryEmbedding` does: f32 `positions * inv_freq`, duplicated over both halves.
pub struct Rope {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
}

impl Rope {
    pub fn new(positions: &Tensor<2, Int>, head_dim: usize, theta: f64, device: &Device) -> Self {
        let [b, t] = positions.dims();
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::<1>::from_data(TensorData::new(inv_freq, [half]), device);
        let pos = positions.clone().float().reshape([b, t, 1]); // (B, T, 1)
        let freqs = pos * inv_freq.reshape([1, 1, half]); // (B, T, half)
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2).reshape([b, 1, t, head_dim]);
        Rope {
            cos: emb.clone().cos(),
            sin: emb.sin(),
        }
    }

    /// x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1].
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        crate::fused::rope(x, self.cos.clone(), self.sin.clone())
    }
}

/// A linear projection `x W + b`, W stored `[in, out]`, with an optional LoRA update
/// (`peft::Lora`) added when adapters are on.
#[derive(Module, Debug)]
pub struct Proj {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub lora: Option<Lora>,
}

impl Proj {
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Proj {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            lora: None,
        }
    }

    /// `(d_in, d_out)`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.shape().dims()
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>, peft: bool) -> Tensor<D> {
        let y = crate::fused::linear(
            x.clone(),
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
        );
        match &self.lora {
            Some(lora) if peft => y + lora.forward(x),
            _ => y,
        }
    }
}

/// What every layer of one forward pass shares: rotary tables, the additive mask `(B, 1, T, S)`,
/// and whether PEFT modules (LoRA, adapters, prefixes) take part (off = the base model).
pub struct LayerCtx {
    pub rope: Rope,
    pub mask: Tensor<4>,
    pub peft: bool,
}

/// Multi-head self-attention with grouped-query key/value heads (Ainslie et al. 2023).
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Proj,
    pub k_proj: Proj,
    pub v_proj: Proj,
    pub o_proj: Proj,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `ctx.mask` is additive, `(B, 1, T, S)`: 0 where a query may attend, a large negative
    /// value where it may not (future positions, padding). With a cache, S counts the cached keys
    /// too. `prefix` holds trained keys and values `(1, KV, P, hd)` (prefix tuning) that every
    /// query sees in front of the sequence; they carry no position, so no rotation.
    pub fn forward(
        &self,
        x: Tensor<3>,
        ctx: &LayerCtx,
        prefix: Option<&(Tensor<4>, Tensor<4>)>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        self.o_proj
            .forward(self.attend(x, ctx, prefix, cache), ctx.peft)
    }

    /// The heads' outputs before the output projection, `(B, T, H·hd)`.
    pub fn attend(
        &self,
        x: Tensor<3>,
        ctx: &LayerCtx,
        prefix: Option<&(Tensor<4>, Tensor<4>)>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x.clone(), ctx.peft)
            .reshape([b, t, h, hd])
            .swap_dims(1, 2); // (B, H, T, hd)
        let k = self
            .k_proj
            .forward(x.clone(), ctx.peft)
            .reshape([b, t, kvh, hd])
            .swap_dims(1, 2); // (B, KV, T, hd)
        let v = self
            .v_proj
            .forward(x, ctx.peft)
            .reshape([b, t, kvh, hd])
            .swap_dims(1, 2); // (B, KV, T, hd)
        let q = ctx.rope.apply(q);
        let k = ctx.rope.apply(k);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v), // (B, KV, S, hd)
            None => (k, v),
        };
        let (k, v, mask) = match prefix {
            Some((pk, pv)) if ctx.peft => {
                let p = pk.dims()[2];
                let k = Tensor::cat(vec![pk.clone().expand([b, kvh, p, hd]), k], 2); // (B, KV, P+S, hd)
                let v = Tensor::cat(vec![pv.clone().expand([b, kvh, p, hd]), v], 2);
                let open = Tensor::zeros([b, 1, t, p], &ctx.mask.device());
                (k, v, Tensor::cat(vec![open, ctx.mask.clone()], 3)) // (B, 1, T, P+S)
            }
            _ => (k, v, ctx.mask.clone()),
        };
        // One fused kernel (crate::fused): grouped-query heads read their shared key/value head
        // in place, and the output comes back stored (B, T, H, hd), so the swap below is free.
        let scale = 1.0 / (hd as f32).sqrt();
        let out = crate::fused::attention(q, k, v, mask, scale); // (B, H, T, hd)
        out.swap_dims(1, 2).reshape([b, t, h * hd])
    }
}

/// The SwiGLU feed-forward block (Shazeer 2020): down(silu(gate(x)) * up(x)).
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Proj,
    pub up_proj: Proj,
    pub down_proj: Proj,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>, peft: bool) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone(), peft);
        let up = self.up_proj.forward(x, peft);
        self.down_proj
            .forward(crate::fused::silu_mul(gate, up), peft)
    }
}

/// One pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h)). Bottleneck adapters
/// (Houlsby et al. 2019), when present, transform each sub-layer's output before its residual.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    pub attn_adapter: Option<Adapter>,
    pub mlp_adapter: Option<Adapter>,
}

impl DecoderLayer {
    /// The seven projections with their module paths inside the layer (`self_attn.q_proj`, ...).
    pub fn projections(&self) -> [(&'static str, &Proj); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &m.gate_proj),
            ("mlp.up_proj", &m.up_proj),
            ("mlp.down_proj", &m.down_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [(&'static str, &mut Proj); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    pub fn forward(
        &self,
        x: Tensor<3>,
        ctx: &LayerCtx,
        prefix: Option<&(Tensor<4>, Tensor<4>)>,
        cache: Option<&mut LayerCache>,
    ) -> Tensor<3> {
        let a = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), ctx, prefix, cache);
        self.after_attention(x, a, ctx)
    }

    /// [`DecoderLayer::forward`]'s output at the flat `(B·T)` positions `at` only, `(1, N, d)`.
    /// Keys and values (and so attention) still cover every position, but the output
    /// projection, the feed-forward block and the adapters run on the N rows alone: for the
    /// last layer, whose other positions nothing reads, that skips about three quarters of its
    /// multiply-adds there. With `cache`, every position's keys and values are appended to it.
    pub fn forward_at(
        &self,
        x: Tensor<3>,
        ctx: &LayerCtx,
        prefix: Option<&(Tensor<4>, Tensor<4>)>,
        cache: Option<&mut LayerCache>,
        at: Tensor<1, Int>,
    ) -> Tensor<3> {
        let heads =
            self.self_attn
                .attend(self.input_layernorm.forward(x.clone()), ctx, prefix, cache);
        let a = self
            .self_attn
            .o_proj
            .forward(rows_at(heads, at.clone()), ctx.peft);
        self.after_attention(rows_at(x, at), a, ctx)
    }

    /// The rest of the block after attention's output projection `a`: its adapter, the
    /// residual onto `x`, and the feed-forward block with its adapter and residual.
    fn after_attention(&self, x: Tensor<3>, a: Tensor<3>, ctx: &LayerCtx) -> Tensor<3> {
        let a = match &self.attn_adapter {
            Some(ad) if ctx.peft => ad.forward(a),
            _ => a,
        };
        let h = x + a;
        let m = self
            .mlp
            .forward(self.post_attention_layernorm.forward(h.clone()), ctx.peft);
        let m = match &self.mlp_adapter {
            Some(ad) if ctx.peft => ad.forward(m),
            _ => m,
        };
        h + m
    }
}

/// The flat `(B·T)` positions `at` of `x` `(B, T, d)`, as `(1, N, d)`.
pub fn rows_at(x: Tensor<3>, at: Tensor<1, Int>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let n = at.dims()[0];
    x.reshape([b * t, d]).select(0, at).reshape([1, n, d])
}

/// Indices as an `Int` tensor on `device`, for [`rows_at`].
pub fn index_tensor(at: &[usize], device: &Device) -> Tensor<1, Int> {
    let idx: Vec<i64> = at.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(idx, [at.len()]), device)
}

/// A fresh burn `Linear` (`[d_in, d_out]` weight), for heads outside the decoder blocks.
pub fn linear(weight: Tensor<2>, bias: Option<Tensor<1>>) -> burn::nn::Linear {
    burn::nn::Linear {
        weight: Param::from_tensor(weight),
        bias: bias.map(Param::from_tensor),
    }
}

/// Builds the blocks of an untrained model from `init(name, shape)`.
pub fn init_layer(
    config: &LlamaConfig,
    i: usize,
    init: &mut dyn FnMut(String, Vec<usize>) -> Tensor<2>,
    device: &Device,
) -> DecoderLayer {
    let (d, f) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (
        config.num_attention_heads * config.head_dim(),
        config.kv_heads() * config.head_dim(),
    );
    let p = format!("model.layers.{i}");
    let bias = |n: usize, on: bool| on.then(|| Tensor::<1>::zeros([n], device));
    let ab = config.attention_bias;
    DecoderLayer {
        input_layernorm: RmsNorm::new(d, config.rms_norm_eps, device),
        self_attn: Attention {
            q_proj: Proj::new(
                init(format!("{p}.self_attn.q_proj.weight"), vec![d, q]),
                bias(q, ab),
            ),
            k_proj: Proj::new(
                init(format!("{p}.self_attn.k_proj.weight"), vec![d, kv]),
                bias(kv, ab),
            ),
            v_proj: Proj::new(
                init(format!("{p}.self_attn.v_proj.weight"), vec![d, kv]),
                bias(kv, ab),
            ),
            o_proj: Proj::new(
                init(format!("{p}.self_attn.o_proj.weight"), vec![q, d]),
                bias(d, ab),
            ),
            n_heads: config.num_attention_heads,
            n_kv_heads: config.kv_heads(),
            head_dim: config.head_dim(),
        },
        post_attention_layernorm: RmsNorm::new(d, config.rms_norm_eps, device),
        attn_adapter: None,
        mlp_adapter: None,
        mlp: Mlp {
            gate_proj: Proj::new(
                init(format!("{p}.mlp.gate_proj.weight"), vec![d, f]),
                bias(f, config.mlp_bias),
            ),
            up_proj: Proj::new(
                init(format!("{p}.mlp.up_proj.weight"), vec![d, f]),
                bias(f, config.mlp_bias),
            ),
            down_proj: Proj::new(
                init(format!("{p}.mlp.down_proj.weight"), vec![f, d]),
                bias(d, config.mlp_bias),
            ),
        },
    }
}
