//! What `sgemm_shapes` and `bf16_shapes` share: the products of `tiny`'s training step, a PPO
//! minibatch and rollout, and `small`'s step, and their operands.

use kiln_model::fused::bf16::Mat;

/// (what, m, k, n, A stored transposed, B stored transposed)
pub const SHAPES: [(&str, usize, usize, usize, bool, bool); 23] = [
    ("x W (q, k, v, o)", 4096, 256, 256, false, false),
    ("x W (gate, up)", 4096, 256, 688, false, false),
    ("x W (down)", 4096, 688, 256, false, false),
    ("x W (head)", 4096, 256, 4096, false, false),
    ("dy Wᵀ (gate, up)", 4096, 688, 256, false, true),
    ("dy Wᵀ (head)", 4096, 4096, 256, false, true),
    ("xᵀ dy (q, k, v, o)", 256, 4096, 256, true, false),
    ("xᵀ dy (gate, up)", 256, 4096, 688, true, false),
    ("xᵀ dy (down)", 688, 4096, 256, true, false),
    ("xᵀ dy (head)", 256, 4096, 4096, true, false),
    ("PPO x W", 832, 256, 688, false, false),
    ("PPO dy Wᵀ", 832, 688, 256, false, true),
    ("PPO xᵀ dy", 256, 832, 688, true, false),
    ("rollout x W", 64, 256, 688, false, false),
    ("rollout head", 64, 256, 4096, false, false),
    ("prefill x W", 1856, 256, 688, false, false),
    ("small x W (q..o)", 4096, 512, 512, false, false),
    ("small x W (gate)", 4096, 512, 1376, false, false),
    ("small x W (down)", 4096, 1376, 512, false, false),
    ("small x W (head)", 4096, 512, 8192, false, false),
    ("small dy Wᵀ (gate)", 4096, 1376, 512, false, true),
    ("small dy Wᵀ (head)", 4096, 8192, 512, false, true),
    ("small xᵀ dy (gate)", 512, 4096, 1376, true, false),
];

/// `n` values in [-1, 1], a different sequence for each seed.
pub fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// A `rows x cols` matrix over `v`, stored row-major, or column-major (`transposed`: a
/// transposed view, as `xᵀ` and `Wᵀ` reach the products).
pub fn view(v: &[f32], rows: usize, cols: usize, transposed: bool) -> Mat {
    let (rs, cs) = if transposed { (1, rows) } else { (cols, 1) };
    Mat {
        ptr: v.as_ptr(),
        rs: rs as isize,
        cs: cs as isize,
    }
}
