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
