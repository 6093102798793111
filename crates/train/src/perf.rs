//! Throughput helpers: the matmul peak that model FLOPs utilization is measured against, and the
//! FLOPs a Llama spends per trained token.

use std::time::Instant;

use kiln_model::burn::tensor::{Distribution, Tensor};
use kiln_model::{default_device, LlamaConfig};

/// GFLOP/s of an n³ matmul on the tensor backend at the process's matmul precision (f32, or bf16
/// inputs with f32 sums, so that MFU is measured against the peak of the arithmetic the model
/// runs): median of `reps` after warm-up.
pub fn peak_gflops(n: usize, reps: usize) -> f64 {
    matmul_gflops(n, reps, false)
}

/// As [`peak_gflops`] but the fastest of `reps`: the denominator of the MFU the trainer logs,
/// measured in a fraction of a second at start-up. The median of a few runs on a busy machine
/// came out low enough to log an MFU above 100%.
pub fn best_gflops(n: usize, reps: usize) -> f64 {
    matmul_gflops(n, reps, true)
}

/// The denominator of the MFU the trainer logs, in GFLOP/s: the CPU's own peak for the
/// products' arithmetic at the precision in effect (`fused::peak`: multiply-adds from registers
/// on every thread, the f32 FMA or bf16's `vdpbf16ps`), or the fastest of a few 512³ products
/// where that is higher (AMX tiles, which `fused::peak` does not measure). Each is a rate the
/// machine reached, so the peak is at least the larger; and `fused::peak` keeps each thread's
/// fastest run, which a busy moment cannot lower. The product alone was the denominator before:
/// measured in a slow moment at the start of a run, it logged pre-training at 97-101% where the
/// same step in another run logged 80%.
pub fn mfu_peak_gflops() -> f64 {
    use kiln_model::fused::{bf16_active, peak};
    // Each thread's best of 15 runs of about 7 ms, 10 ms apart (5 back to back of 3 ms measured
    // 211 and 235 GFLOP/s in two runs a minute apart).
    let hw = if bf16_active() {
        peak::bf16_peak(2 << 20, 15)
    } else {
        Some(peak::f32_peak(2 << 20, 15))
    };
    let hw = hw.filter(|p| p.check()).map_or(0.0, |p| p.gflops);
    hw.max(best_gflops(512, 12))
}

fn matmul_gflops(n: usize, reps: usize, best: bool) -> f64 {
    let device = default_device();
    let a = Tensor::<2>::random([n, n], Distribution::Default, &device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, &device);
    let mut times = vec![];
    for i in 0..reps + 2 {
        let t = Instant::now();
        let _ = kiln_model::to_vec(kiln_model::fused::matmul(a.clone(), b.clone()));
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let t = if best {
        times[0]
    } else {
        times[times.len() / 2]
    };
    2.0 * (n as f64).powi(3) / t / 1e9
}

/// Training FLOPs per token: 6 per matmul weight (the embedding lookup excluded, the head
/// included even when tied) plus attention scores and values, as nanoGPT / PaLM count them.
pub fn train_flops_per_token(c: &LlamaConfig, seq_len: usize) -> f64 {
    let embed = c.vocab_size * c.hidden_size;
    let matmul = c.num_params() - embed + if c.tie_word_embeddings { embed } else { 0 };
    6.0 * matmul as f64
        + 6.0 * (c.num_hidden_layers * c.num_attention_heads * c.head_dim() * seq_len) as f64
}

/// The FLOPs of a Llama's passes as Kiln runs them: the MFU the trainer logs for each stage.
///
/// [`train_flops_per_token`] counts a pre-training step, where every position runs every layer
/// and the language-model head. The post-training stages do less, and counting them the same
/// way logged an MFU above 100% for the reward model (no vocabulary head; its last layer only at
/// each row's last token). So a pass is counted from what it computes: every layer's q, k and v
/// projections and attention (causal: position i reads i + 1 keys) at every position; the last
/// layer's output projection and feed-forward block, and the head, only at the positions whose
/// hidden state is read (`Llama::hidden_at`); in training, the backward pass's input gradients
/// for every product, weight gradients for the share `dw` of the linear weights that train (1
/// in full training, about 0 for LoRA), and attention's four backward products. Padding is not
/// counted, nor adapters' own small products, norms and element-wise work.
#[derive(Clone, Debug, PartialEq)]
pub struct FlopCount {
    layers: f64,
    hidden: f64,
    /// Multiply-adds of one position's q, k and v projections, and of its output projection
    /// and feed-forward block, in one layer.
    qkv: f64,
    rest: f64,
    /// Query heads x head width: attention's multiply-adds per (query, key) pair, for each of
    /// its two products.
    attn: f64,
    /// The share of the linear weights that get a gradient in training. The trainer passes the
    /// share of all the model's parameters that train, which counts the embedding and the
    /// norms too: exact for full training (1) and for everything frozen (0), close for LoRA.
    pub dw: f64,
    /// The language-model head's width.
    pub vocab: usize,
}

impl FlopCount {
    pub fn new(c: &LlamaConfig, dw: f64) -> Self {
        let (d, hd) = (c.hidden_size as f64, c.head_dim() as f64);
        let (q, kv) = (c.num_attention_heads as f64 * hd, c.kv_heads() as f64 * hd);
        FlopCount {
            layers: c.num_hidden_layers as f64,
            hidden: d,
            qkv: d * (q + 2.0 * kv),
            rest: q * d + 3.0 * d * c.intermediate_size as f64,
            attn: q,
            dw: dw.clamp(0.0, 1.0),
            vocab: c.vocab_size,
        }
    }

    /// One row of `len` positions, `read` of them (at most `len`) through the last layer's
    /// output projection and feed-forward block into a head of `head` outputs (the vocabulary
    /// for logits, 1 for a reward model's score or a value head): the forward pass's FLOPs, and
    /// with `train` the backward pass's too.
    pub fn row(&self, len: usize, read: usize, head: usize, train: bool) -> f64 {
        let (len, read) = (len as f64, read.min(len) as f64);
        let linear = if self.layers > 0.0 {
            self.layers * len * self.qkv + ((self.layers - 1.0) * len + read) * self.rest
        } else {
            0.0
        } + read * self.hidden * head as f64;
        let attention = self.layers * self.attn * len * (len + 1.0);
        if train {
            2.0 * (linear * (2.0 + self.dw) + 3.0 * attention)
        } else {
            2.0 * (linear + attention)
        }
    }

    /// [`Self::row`] summed over rows of `(len, read)`.
    pub fn rows(
        &self,
        rows: impl IntoIterator<Item = (usize, usize)>,
        head: usize,
        train: bool,
    ) -> f64 {
        rows.into_iter()
            .map(|(len, read)| self.row(len, read, head, train))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pre-training row (every position read, the vocabulary head, full training) counts as
    /// nanoGPT's 6N + attention per token, up to the causal count's (T + 1) / T and the norms'
    /// weights, which `num_params` counts and no product multiplies by.
    #[test]
    fn a_pretraining_row_is_six_n_plus_attention() {
        let c = LlamaConfig::new(300, 64, 160, 3, 4, 2, 128);
        let t = 100;
        let count = FlopCount::new(&c, 1.0);
        let got = count.row(t, t, c.vocab_size, true);
        let d = c.hidden_size;
        let norms = (2 * c.num_hidden_layers + 1) * d;
        let matmul = (c.num_params() - c.vocab_size * d - norms) as f64;
        let attn = (c.num_hidden_layers * c.num_attention_heads * c.head_dim()) as f64;
        let want = 6.0 * matmul * t as f64 + 6.0 * attn * (t * (t + 1)) as f64;
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        // nanoGPT's per-token count (attention at T, not (T + 1) / 2 per position)
        let nano = train_flops_per_token(&c, t) * t as f64 - 6.0 * norms as f64 * t as f64;
        assert!(
            (got / nano - (t as f64 + 1.0) / t as f64).abs() < 0.01,
            "{got} vs {nano}"
        );
    }

    /// By hand for a 1-layer model: d = 8, 2 heads of 4 (1 key/value head), FFN 16, 10 outputs.
    #[test]
    fn reads_and_frozen_weights_count_what_runs() {
        let c = LlamaConfig::new(10, 8, 16, 1, 2, 1, 64);
        let (len, read) = (5.0, 2.0);
        // q 8x8, k and v 8x4 each, at every position; o 8x8 and the MLP 3 x 8x16 at the read
        // positions, and the head 8x10 there.
        let linear = len * (64.0 + 2.0 * 32.0) + read * (64.0 + 3.0 * 128.0) + read * 80.0;
        // scores and values: 2 heads x 4 wide x (1 + 2 + 3 + 4 + 5) pairs, two products
        let attention = 2.0 * 8.0 * 15.0;
        let forward = 2.0 * (linear + attention);
        let count = FlopCount::new(&c, 1.0);
        assert_eq!(count.row(5, 2, 10, false), forward);
        // forward, input gradients and weight gradients of every product; attention's four backward
        // products
        assert_eq!(count.row(5, 2, 10, true), 3.0 * forward);
        // frozen linear weights: input gradients only
        let frozen = FlopCount::new(&c, 0.0);
        assert_eq!(
            frozen.row(5, 2, 10, true),
            2.0 * (2.0 * linear + 3.0 * attention)
        );
        // a score head reads one position; rows add up
        assert_eq!(
            count.rows([(5, 1), (3, 1)], 1, true),
            count.row(5, 1, 1, true) + count.row(3, 1, 1, true)
        );
        assert!(count.row(5, 1, 1, true) < count.row(5, 5, 10, true));
    }
}
