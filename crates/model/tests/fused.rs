//! Each fused kernel against the composition of burn ops it replaces: the same values and the
//! same gradients (through burn's autodiff of the reference), on odd shapes, strided inputs,
//! grouped-query heads and masks with padding. Plus a finite-difference check of one gradient.

use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_model::fused;
use kiln_model::{default_device, to_vec};

/// Deterministic values in about [-2, 2].
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn tensor<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(data(n, seed), shape), device)
}

/// `a` (a kernel's result) against `b` (the burn reference). With `KILN_FUSED=0` both sides
/// would be the reference and the comparison would pass without checking anything: refuse.
fn assert_close(what: &str, a: Vec<f32>, b: Vec<f32>, tol: f32) {
    assert!(
        fused::enabled(),
        "{what}: the fused kernels are off (KILN_FUSED=0), so this compares the reference with itself"
    );
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: worst difference {worst} > {tol}");
}

/// Causal mask `(B, 1, T, S)` over S = P + T keys (P cached), with the first `pad[b]` key positions
/// of row b masked out (left padding), with the value Kiln's masks use.
fn mask(b: usize, t: usize, p: usize, pad: &[usize], device: &Device) -> Tensor<4> {
    let s = p + t;
    let mut m = vec![0f32; b * t * s];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..s {
                if j > p + i || j < pad[bi] {
                    m[(bi * t + i) * s + j] = kiln_model::llama::MASKED;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, 1, t, s]), device)
}

type AttnFn = fn(Tensor<4>, Tensor<4>, Tensor<4>, Tensor<4>, f32) -> Tensor<4>;

/// Output and gradients of sum(attention(q, k, v) * w) for q built `(B, T, H, hd)` and viewed
/// `(B, H, T, hd)` (strided, as the model passes it).
fn attention_run(f: AttnFn, kvh: usize, pad: &[usize]) -> Vec<Vec<f32>> {
    attention_run_t(f, kvh, pad, 5)
}

fn attention_run_t(f: AttnFn, kvh: usize, pad: &[usize], t: usize) -> Vec<Vec<f32>> {
    let device = default_device().autodiff();
    let (b, h, hd, p) = (2, 4, 8, 3);
    attention_outputs(f, [b, h, kvh, hd], mask(b, t, p, pad, &device), 1)
}

/// Output and gradients of sum(attention(q, k, v) * w) under `mask` `(B, 1, T, S)` (on an
/// autodiff device), with `[B, H, KV, hd]` heads and inputs drawn from `seed`.
fn attention_outputs(
    f: AttnFn,
    [b, h, kvh, hd]: [usize; 4],
    mask: Tensor<4>,
    seed: u64,
) -> Vec<Vec<f32>> {
    let device = mask.device();
    let [_, _, t, s] = mask.dims();
    let q = tensor([b, t, h, hd], seed, &device).require_grad();
    let k = tensor([b, kvh, s, hd], seed + 1, &device).require_grad();
    let v = tensor([b, s, kvh, hd], seed + 2, &device).require_grad();
    let w = tensor([b, h, t, hd], seed + 3, &device);
    let out = f(
        q.clone().swap_dims(1, 2),
        k.clone(),
        v.clone().swap_dims(1, 2),
        mask,
        0.35,
    );
    let grads = (out.clone() * w).sum().backward();
    vec![
        to_vec(out),
        to_vec(q.grad(&grads).unwrap()),
        to_vec(k.grad(&grads).unwrap()),
        to_vec(v.grad(&grads).unwrap()),
    ]
}

#[test]
fn fused_attention_matches_reference_values_and_gradients() {
    for (kvh, pad) in [(4, [0, 0]), (2, [0, 2]), (1, [1, 4])] {
        let fused = attention_run(fused::attention, kvh, &pad);
        let reference = attention_run(fused::attention_reference, kvh, &pad);
        for (name, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.into_iter().zip(reference))
        {
            assert_close(&format!("{name} (kv heads {kvh}, pad {pad:?})"), a, b, 2e-5);
        }
    }
}

#[test]
fn fused_attention_matches_on_long_sequences_with_padding_rows() {
    // Longer sequences, and padding rows whose every key is masked (pad 150 > their causal
    // reach): they attend uniformly, as burn's softmax makes them.
    for (kvh, pad) in [(2, [0, 70]), (4, [150, 1])] {
        let fused = attention_run_t(fused::attention, kvh, &pad, 150);
        let reference = attention_run_t(fused::attention_reference, kvh, &pad, 150);
        for (name, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.into_iter().zip(reference))
        {
            assert_close(
                &format!("{name} (T 150, kv heads {kvh}, pad {pad:?})"),
                a,
                b,
                2e-5,
            );
        }
    }
}

/// Output and gradients of sum(attention(q, k, v) * w) over rows of packed segments (block-
/// diagonal causal masks, as `kiln_model::Packing` builds), with a few slots past the last
/// segment that see only themselves, and (with `hole`) one key masked inside a segment.
fn packed_run(f: AttnFn, segments: &[usize], t: usize, hole: bool) -> Vec<Vec<f32>> {
    let device = default_device().autodiff();
    let (b, h, kvh, hd) = (2, 4, 2, 8);
    let mut m = vec![kiln_model::llama::MASKED; b * t * t];
    for row in 0..b {
        let mut start = 0;
        // the second row holds the segments in reverse order
        let order: Vec<usize> = if row == 0 {
            segments.to_vec()
        } else {
            segments.iter().rev().copied().collect()
        };
        for len in order {
            for i in start..start + len {
                for j in start..=i {
                    m[(row * t + i) * t + j] = 0.0;
                }
            }
            start += len;
        }
        for i in start..t {
            m[(row * t + i) * t + i] = 0.0;
        }
    }
    if hole {
        for i in 6..t {
            m[i * t + 5] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_data(TensorData::new(m, [b, 1, t, t]), &device);
    attention_outputs(f, [b, h, kvh, hd], mask, 11)
}

#[test]
fn fused_attention_matches_on_packed_segments() {
    // Segments longer and shorter than a tile of query rows (32), a closed key inside one.
    for (segments, t, hole) in [
        (vec![45, 30, 3], 81, false),
        (vec![70, 9], 80, true),
        (vec![1, 1, 33], 35, false),
    ] {
        let fused = packed_run(fused::attention, &segments, t, hole);
        let reference = packed_run(fused::attention_reference, &segments, t, hole);
        for (name, (a, b)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.into_iter().zip(reference))
        {
            assert_close(&format!("{name} (segments {segments:?})"), a, b, 2e-5);
        }
    }
}

/// Past the budget of kept probabilities (`fused::kernels::keep_probs_max`, here 0 bytes) the
/// backward pass computes each head's probabilities again from q, k and the mask: the output and
/// every gradient bit for bit those of the pass that keeps them, and the reference's (grouped
/// heads, left padding, rows whose every key is masked, packed segments with a closed key).
#[test]
fn fused_attention_recomputing_its_probabilities_equals_keeping_them() {
    use fused::kernels::{keep_probs_max, set_keep_probs_max};
    let budget = keep_probs_max();
    let runs = |f: AttnFn| {
        vec![
            attention_run(f, 2, &[0, 2]),
            attention_run(f, 1, &[1, 4]),
            attention_run_t(f, 2, &[0, 70], 150),
            attention_run_t(f, 4, &[150, 1], 150),
            packed_run(f, &[70, 9], 80, true),
            packed_run(f, &[1, 1, 33], 35, false),
        ]
    };
    // Whether a forward pass under the budget in force kept its probabilities.
    let kept = || {
        use burn::backend::flex::FlexTensor;
        let flex = |shape: [usize; 4], seed| {
            let n = shape.iter().product();
            FlexTensor::from_data(TensorData::new(data(n, seed), shape))
        };
        let (q, k, v) = (
            flex([1, 2, 4, 8], 1),
            flex([1, 2, 4, 8], 2),
            flex([1, 2, 4, 8], 3),
        );
        let m = FlexTensor::from_data(TensorData::new(vec![0f32; 16], [1, 1, 4, 4]));
        let (_, saved) = fused::kernels::attention(q, k, v, m, 0.35, true);
        saved.expect("kept for a backward pass").p.is_some()
    };
    set_keep_probs_max(usize::MAX);
    assert!(kept(), "an unbounded budget keeps the probabilities");
    let keeping = runs(fused::attention);
    set_keep_probs_max(0);
    assert!(!kept(), "a budget of 0 bytes keeps none");
    let recomputing = runs(fused::attention);
    set_keep_probs_max(budget);
    let reference = runs(fused::attention_reference);
    for (case, ((keeping, recomputing), reference)) in keeping
        .into_iter()
        .zip(recomputing)
        .zip(reference)
        .enumerate()
    {
        for (name, ((a, b), r)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(keeping.into_iter().zip(recomputing).zip(reference))
        {
            assert_eq!(a, b, "case {case}, {name}: recomputed against kept");
            assert_close(&format!("case {case}, {name}"), b, r, 2e-5);
        }
    }
}

/// A mask whose keys are not contiguous (a transposed view) gives the same bits as the same mask
/// stored by rows, output and gradients: the kernel copies it once into rows and reads those
/// (read in place as rows, the transposed view gives other bits; left padding puts open keys past
/// key 0). (The recomputed probabilities go through the same softmax; the process-wide budget is
/// left to the test that switches it.)
#[test]
fn fused_attention_reads_a_strided_mask_as_a_contiguous_one() {
    let device = default_device().autodiff();
    let (b, t, p, pad) = (2, 150, 3, [70, 1]);
    let rows = mask(b, t, p, &pad, &device);
    // The same values stored (B, 1, S, T), viewed (B, 1, T, S): the keys T apart.
    let s = p + t;
    let m = to_vec(rows.clone());
    let stored: Vec<f32> = (0..b * s * t)
        .map(|x| {
            let (bi, j, i) = (x / (s * t), x / t % s, x % t);
            m[(bi * t + i) * s + j]
        })
        .collect();
    let strided =
        Tensor::<4>::from_data(TensorData::new(stored, [b, 1, s, t]), &device).swap_dims(2, 3);
    assert_eq!(to_vec(strided.clone()), to_vec(rows.clone()));
    let a = attention_outputs(fused::attention, [b, 4, 2, 8], rows, 1);
    let c = attention_outputs(fused::attention, [b, 4, 2, 8], strided, 1);
    for (name, (a, c)) in ["out", "dq", "dk", "dv"].iter().zip(a.into_iter().zip(c)) {
        assert_eq!(a, c, "{name}: strided mask against rows");
    }
}

#[test]
fn fused_attention_without_autodiff_matches_and_broadcasts_a_one_row_mask() {
    // Decoding: one query row, the mask broadcast over the batch.
    let device = default_device();
    let (b, h, kvh, s, hd) = (3, 4, 2, 9, 16);
    let q = tensor([b, h, 1, hd], 5, &device);
    let k = tensor([b, kvh, s, hd], 6, &device);
    let v = tensor([b, kvh, s, hd], 7, &device);
    let m = mask(1, 1, s - 1, &[2], &device);
    let a = fused::attention(q.clone(), k.clone(), v.clone(), m.clone(), 0.25);
    let r = fused::attention_reference(q, k, v, m, 0.25);
    assert_close("decode", to_vec(a), to_vec(r), 2e-5);
}

fn logprob_run(f: fn(Tensor<2>, Tensor<1, Int>) -> Tensor<1>) -> Vec<Vec<f32>> {
    let device = default_device().autodiff();
    let (n, v) = (7, 53);
    // Logits as a transposed view, to exercise the non-contiguous path; scaled up so that
    // the softmax is peaked.
    let x = (tensor([v, n], 8, &device) * 6.0).require_grad();
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(vec![0i64, 52, 3, 17, 17, 40, 9], [n]),
        &device,
    );
    let w = tensor([n], 9, &device);
    let lp = f(x.clone().transpose(), targets);
    let grads = (lp.clone() * w).sum().backward();
    vec![to_vec(lp), to_vec(x.grad(&grads).unwrap())]
}

#[test]
fn fused_token_logprobs_match_reference_values_and_gradients() {
    let fused = logprob_run(fused::token_logprobs);
    let reference = logprob_run(fused::token_logprobs_reference);
    for (name, (a, b)) in ["logprobs", "dlogits"]
        .iter()
        .zip(fused.into_iter().zip(reference))
    {
        assert_close(name, a, b, 2e-5);
    }
}

#[test]
fn fused_token_logprobs_gradient_matches_finite_differences() {
    let device = default_device();
    let (n, v) = (3, 11);
    let base = data(n * v, 10);
    let targets = vec![4i64, 0, 10];
    let weights = [0.7f32, -1.3, 2.0];
    let loss = |x: &[f32]| -> f64 {
        let t = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [n, v]), &device);
        let ids = Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [n]), &device);
        to_vec(fused::token_logprobs(t, ids))
            .iter()
            .zip(&weights)
            .map(|(a, w)| (*a * w) as f64)
            .sum()
    };
    let ad = default_device().autodiff();
    let x = Tensor::<2>::from_data(TensorData::new(base.clone(), [n, v]), &ad).require_grad();
    let ids = Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [n]), &ad);
    let w = Tensor::<1>::from_data(TensorData::new(weights.to_vec(), [n]), &ad);
    let grads = (fused::token_logprobs(x.clone(), ids) * w).sum().backward();
    let analytic = to_vec(x.grad(&grads).unwrap());
    let eps = 1e-2f32;
    for i in 0..n * v {
        let (mut up, mut down) = (base.clone(), base.clone());
        up[i] += eps;
        down[i] -= eps;
        let numeric = (loss(&up) - loss(&down)) / (2.0 * eps as f64);
        assert!(
            (numeric - analytic[i] as f64).abs() < 2e-3,
            "d/dx[{i}]: finite differences {numeric}, kernel {}",
            analytic[i]
        );
    }
}

fn silu_run(f: fn(Tensor<3>, Tensor<3>) -> Tensor<3>) -> Vec<Vec<f32>> {
    let device = default_device().autodiff();
    let g = (tensor([3, 5, 37], 11, &device) * 4.0).require_grad();
    let u = tensor([3, 5, 37], 12, &device).require_grad();
    let w = tensor([3, 5, 37], 13, &device);
    let y = f(g.clone(), u.clone());
    let grads = (y.clone() * w).sum().backward();
    vec![
        to_vec(y),
        to_vec(g.grad(&grads).unwrap()),
        to_vec(u.grad(&grads).unwrap()),
    ]
}

#[test]
fn fused_silu_mul_matches_reference_values_and_gradients() {
    let fused = silu_run(fused::silu_mul);
    let reference = silu_run(fused::silu_mul_reference);
    for (name, (a, b)) in ["y", "dgate", "dup"]
        .iter()
        .zip(fused.into_iter().zip(reference))
    {
        assert_close(name, a, b, 2e-5);
    }
}

fn norm_run(f: fn(Tensor<3>, Tensor<1>, f64) -> Tensor<3>) -> Vec<Vec<f32>> {
    let device = default_device().autodiff();
    let x = (tensor([3, 7, 41], 14, &device) * 3.0).require_grad();
    let g = tensor([41], 15, &device).require_grad();
    let w = tensor([3, 7, 41], 16, &device);
    let y = f(x.clone(), g.clone(), 1e-5);
    let grads = (y.clone() * w).sum().backward();
    vec![
        to_vec(y),
        to_vec(x.grad(&grads).unwrap()),
        to_vec(g.grad(&grads).unwrap()),
    ]
}

#[test]
fn fused_rms_norm_weight_gradient_is_the_same_bits_every_time() {
    // Many row blocks, summed into one weight gradient while the other thread is busy with
    // another copy: an order of summation that depended on rayon's work stealing would show.
    let run = || {
        let device = default_device().autodiff();
        let x = tensor([64, 96, 64], 21, &device).require_grad();
        let g = tensor([64], 22, &device).require_grad();
        let w = tensor([64, 96, 64], 23, &device);
        let grads = (fused::rms_norm(x, g.clone(), 1e-5) * w).sum().backward();
        to_vec(g.grad(&grads).unwrap())
    };
    let first = run();
    for _ in 0..8 {
        let (a, b) = rayon::join(run, run);
        assert_eq!(a, first, "the weight gradient changed between runs");
        assert_eq!(b, first, "the weight gradient changed between runs");
    }
}

#[test]
fn fused_rms_norm_matches_reference_values_and_gradients() {
    let fused = norm_run(fused::rms_norm);
    let reference = norm_run(fused::rms_norm_reference);
    for (name, (a, b)) in ["y", "dx", "dweight"]
        .iter()
        .zip(fused.into_iter().zip(reference))
    {
        assert_close(name, a, b, 2e-5);
    }
}

fn rope_run(f: fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>) -> Vec<Vec<f32>> {
    let device = default_device().autodiff();
    let (b, h, t, hd) = (2, 3, 5, 8);
    let positions = Tensor::<2, Int>::from_data(
        TensorData::new(vec![0i64, 1, 2, 3, 4, 7, 8, 9, 10, 11], [b, t]),
        &device,
    );
    let rope = kiln_model::layers::Rope::new(&positions, hd, 10000.0, &device);
    // Stored (B, T, H, hd) and viewed (B, H, T, hd), as the projections produce it.
    let x = tensor([b, t, h, hd], 17, &device).require_grad();
    let w = tensor([b, h, t, hd], 18, &device);
    let y = f(x.clone().swap_dims(1, 2), rope.cos, rope.sin);
    let grads = (y.clone() * w).sum().backward();
    vec![to_vec(y), to_vec(x.grad(&grads).unwrap())]
}

#[test]
fn fused_rope_matches_reference_values_and_gradients() {
    let fused = rope_run(fused::rope);
    let reference = rope_run(fused::rope_reference);
    for (name, (a, b)) in ["y", "dx"].iter().zip(fused.into_iter().zip(reference)) {
        assert_close(name, a, b, 1e-6);
    }
}

#[test]
fn entropy_matches_the_definition() {
    let (n, v) = (4, 29);
    let x: Vec<f32> = data(n * v, 19).iter().map(|a| a * 5.0).collect();
    let logits = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &default_device());
    let got = to_vec(fused::entropy(logits));
    for (row, h) in x.chunks(v).zip(got) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&a| (a as f64 - m).exp()).sum();
        let want: f64 = row
            .iter()
            .map(|&a| {
                let p = (a as f64 - m).exp() / z;
                -p * p.ln()
            })
            .sum();
        assert!((h as f64 - want).abs() < 1e-5, "entropy {h} vs {want}");
    }
}

#[test]
fn fused_entropy_matches_reference_on_an_autodiff_view() {
    // Logits of an autodiff graph, as a transposed view (PPO measures the entropy of the
    // policy's logits while they are in the graph); rows longer than a SIMD chunk, with a tail.
    let device = default_device().autodiff();
    let (n, v) = (6, 133);
    let x = (tensor([v, n], 20, &device) * 4.0)
        .require_grad()
        .transpose();
    let got = fused::entropy(x.clone());
    let want = fused::entropy_reference(x.clone());
    assert_close("entropy", to_vec(got), to_vec(want), 1e-5);
}

#[test]
fn fused_adamw_matches_reference() {
    let device = default_device();
    let n = 40_000; // more than one block: the parallel path
    let t = |seed| Tensor::<1>::from_data(TensorData::new(data(n, seed), [n]), &device);
    let v0 = t(22).abs();
    let step = fused::simd::AdamWStep {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 0.1,
        bc1: 0.19,
        bc2: 0.0975,
        grad_scale: 0.7,
    };
    let a = fused::adamw(t(20), t(21), v0.clone(), t(23), step);
    let b = fused::adamw_reference(t(20), t(21), v0, t(23), step);
    assert_close("x", to_vec(a.0), to_vec(b.0), 1e-6);
    assert_close("m", to_vec(a.1), to_vec(b.1), 1e-6);
    assert_close("v", to_vec(a.2), to_vec(b.2), 1e-6);
}

#[test]
fn fused_sum_squares_matches_an_f64_sum() {
    let device = default_device();
    // More than one block (the parallel path), a single block, and a transposed view (copied).
    for (rows, cols, transposed) in [(300, 170, false), (7, 33, false), (130, 150, true)] {
        let v = data(rows * cols, 31);
        let mut x = Tensor::<2>::from_data(TensorData::new(v.clone(), [rows, cols]), &device);
        if transposed {
            x = x.transpose();
        }
        let want: f64 = v.iter().map(|&a| a as f64 * a as f64).sum();
        let got = fused::sum_squares(x);
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "{rows}x{cols}: {got} vs {want}"
        );
    }
}

/// `a (m, k) · b (k, n)` in f64 from row-major data.
fn matmul_f64(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                .sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[test]
fn few_rows_matmul_matches_f64_on_every_tile_remainder_and_layout() {
    let device = default_device();
    // Row counts around the 6-row tile, column counts around the 16- and 32-column tiles, and a
    // long sum; both operands also read as slices of larger tensors (row strides above their width).
    for (m, k, n) in [
        (1, 1, 1),
        (5, 37, 15),
        (6, 64, 16),
        (7, 33, 33),
        (16, 256, 100),
        (32, 129, 64),
        (3, 700, 47),
        // Up to 64 rows: a rollout's decoding at batch 64 (skinny::ROWS).
        (50, 96, 33),
        (64, 200, 70),
        // One and five rows and a weight above skinny::ONE_ROW_MIN_WEIGHT: decoding's products
        // at batch 1 and 5.
        (1, 512, 600),
        (5, 512, 600),
    ] {
        let (a, b) = (data(m * k, 1), data(k * n, 2));
        let want = matmul_f64(&a, &b, m, k, n);
        let tol = 1e-6 * (k as f32).sqrt() * 4.0;
        let ta = Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device);
        let tb = Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device);
        assert_close(
            &format!("({m},{k},{n})"),
            to_vec(fused::matmul_rows(ta.clone(), tb.clone())),
            want.clone(),
            tol,
        );
        // Slices: a of a (m, k + 3) tensor, b of a (k, n + 5) one.
        let wide_a =
            Tensor::cat(vec![ta.clone(), Tensor::ones([m, 3], &device)], 1).slice([0..m, 0..k]);
        let wide_b =
            Tensor::cat(vec![tb.clone(), Tensor::ones([k, 5], &device)], 1).slice([0..k, 0..n]);
        assert_close(
            &format!("({m},{k},{n}) strided"),
            to_vec(fused::matmul_rows(wide_a, wide_b)),
            want.clone(),
            tol,
        );
        // b stored transposed (a tied head's embedding): the gemm fallback.
        let b_t: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // (n, k)
        let bt = Tensor::<2>::from_data(TensorData::new(b_t, [n, k]), &device).transpose();
        assert_close(
            &format!("({m},{k},{n}) bᵀ"),
            to_vec(fused::matmul_rows(ta.clone(), bt)),
            want.clone(),
            tol,
        );
        // The layer-level entry point on 3-D decode inputs, with a bias: the kernel where
        // skinny::takes it (16 to 64 rows, and the one row of (1, 512, 600) here), Kiln's f32
        // product otherwise.
        let bias = Tensor::<1>::from_data(TensorData::new(data(n, 3), [n]), &device);
        let got = fused::linear(
            ta.clone().reshape([m, 1, k]),
            tb.clone(),
            Some(bias.clone()),
        );
        let reference = burn::tensor::module::linear(ta.reshape([m, 1, k]), tb, Some(bias));
        assert_close(
            &format!("({m},{k},{n}) linear"),
            to_vec(got),
            to_vec(reference),
            tol,
        );
    }
}

#[test]
fn few_rows_matmul_does_not_depend_on_the_thread_count() {
    let device = default_device();
    // Sixteen rows, and one and five rows with a weight large enough to be split between the
    // threads.
    for (m, k, n) in [(16, 256, 688), (1, 512, 600), (5, 512, 600)] {
        assert!(
            fused::skinny::takes(m, k, n),
            "({m},{k},{n}) is not the kernel's"
        );
        let ta = Tensor::<2>::from_data(TensorData::new(data(m * k, 4), [m, k]), &device);
        let tb = Tensor::<2>::from_data(TensorData::new(data(k * n, 5), [k, n]), &device);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| to_vec(fused::matmul_rows(ta.clone(), tb.clone())))
        };
        let one = run(1);
        for threads in [2, 3, 5] {
            assert!(
                run(threads) == one,
                "({m},{k},{n}): {threads} threads changed the bits"
            );
        }
    }
}

/// `aᵀ` of a row-major `(r, c)` matrix, row-major `(c, r)`.
fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    (0..r * c).map(|i| a[(i % r) * c + i / r]).collect()
}

#[test]
fn f32_matmul_op_matches_f64_values_and_gradients() {
    let device = default_device().autodiff();
    // A one-thread product and one above the 192³ threshold where gemm runs on every core; the
    // weight trained or frozen, stored as is or transposed (a tied head).
    for (m, k, n) in [(7, 33, 15), (300, 200, 130)] {
        let (a, b, g) = (data(m * k, 11), data(k * n, 12), data(m * n, 13));
        let want_y = matmul_f64(&a, &b, m, k, n);
        let want_da = matmul_f64(&g, &transpose(&b, k, n), m, n, k);
        let want_db = matmul_f64(&transpose(&a, m, k), &g, k, m, n);
        let tol = 1e-6 * (m.max(k) as f32).sqrt() * 4.0;
        for (train_b, stored_t) in [(true, false), (false, false), (true, true)] {
            let what = format!("({m},{k},{n}) b trained {train_b}, stored transposed {stored_t}");
            let ta =
                Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device).require_grad();
            let tb = if stored_t {
                Tensor::<2>::from_data(TensorData::new(transpose(&b, k, n), [n, k]), &device)
            } else {
                Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device)
            };
            let tb = if train_b { tb.require_grad() } else { tb };
            let op_b = if stored_t {
                tb.clone().transpose()
            } else {
                tb.clone()
            };
            let y = fused::matmul_f32(ta.clone(), op_b);
            let tg = Tensor::<2>::from_data(TensorData::new(g.clone(), [m, n]), &device);
            let grads = (y.clone() * tg).sum().backward();
            assert_close(&format!("{what}: y"), to_vec(y), want_y.clone(), tol);
            let da = to_vec(ta.grad(&grads).expect("a is trained"));
            assert_close(&format!("{what}: da"), da, want_da.clone(), tol);
            match tb.grad(&grads) {
                Some(db) => {
                    assert!(train_b, "{what}: a frozen operand got a gradient");
                    let db = to_vec(db);
                    let db = if stored_t { transpose(&db, n, k) } else { db };
                    assert_close(&format!("{what}: db"), db, want_db.clone(), tol);
                }
                None => assert!(!train_b, "{what}: no gradient for the trained operand"),
            }
        }
    }
    // The layer entry point on 3-D inputs with a bias, against burn's linear, values and
    // gradients (the path every linear layer of a training step takes).
    let (bsz, t, k, n) = (3, 70, 48, 40);
    let x = tensor([bsz, t, k], 14, &device).require_grad();
    let w = tensor([k, n], 15, &device).require_grad();
    let bias = tensor([n], 16, &device).require_grad();
    let g = tensor([bsz, t, n], 17, &device);
    let run = |fused_path: bool| {
        let y = if fused_path {
            fused::linear(x.clone(), w.clone(), Some(bias.clone()))
        } else {
            burn::tensor::module::linear(x.clone(), w.clone(), Some(bias.clone()))
        };
        let grads = (y.clone() * g.clone()).sum().backward();
        [
            to_vec(y),
            to_vec(x.grad(&grads).unwrap()),
            to_vec(w.grad(&grads).unwrap()),
            to_vec(bias.grad(&grads).unwrap()),
        ]
    };
    let (got, reference) = (run(true), run(false));
    for (what, (a, b)) in ["y", "dx", "dw", "dbias"]
        .iter()
        .zip(got.into_iter().zip(reference))
    {
        assert_close(&format!("linear {what}"), a, b, 1e-5);
    }
}

#[test]
fn packed_few_rows_matmul_is_the_same_bits_as_reading_the_weight_in_place() {
    // Strip remainders around the 16- and 32-column tiles, row remainders around the 6-row tile.
    for (m, k, n) in [
        (1, 1, 1),
        (5, 37, 15),
        (16, 64, 16),
        (7, 33, 33),
        (32, 129, 70),
    ] {
        let (a, b) = (data(m * k, 21), data(k * n, 22));
        if !fused::skinny::available() {
            // No copy of the kernel on this CPU (or KILN_SIMD=baseline): matmul_rows takes gemm,
            // which is checked instead.
            let device = default_device();
            let ta = Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device);
            let tb = Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device);
            assert_close(
                &format!("({m},{k},{n}) without the kernel"),
                to_vec(fused::matmul_rows(ta, tb)),
                matmul_f64(&a, &b, m, k, n),
                1e-6 * (k as f32).sqrt() * 4.0,
            );
            continue;
        }
        // SAFETY: both slices are row-major matrices of these shapes.
        let (in_place, packed) = unsafe {
            let p = fused::skinny::pack(k, n, b.as_ptr(), n);
            (
                fused::skinny::matmul(m, k, n, a.as_ptr(), k, b.as_ptr(), n),
                fused::skinny::matmul_packed(m, a.as_ptr(), k, &p),
            )
        };
        assert!(
            in_place == packed,
            "({m},{k},{n}): packing changed the bits"
        );
    }
}

#[test]
fn few_rows_matmul_never_uses_a_stale_packed_weight() {
    let device = default_device();
    let (m, k, n) = (16, 48, 40);
    let (a, b) = (data(m * k, 23), data(k * n, 24));
    let ta = Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device);
    let mut w = Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device);
    let mut b = b;
    let tol = 1e-6 * (k as f32).sqrt() * 4.0;
    for round in 0..3 {
        // Twice with the same weight (the second from the kept copy), then a changed weight, which
        // burn may compute in place when it holds the only reference to the buffer.
        for again in 0..2 {
            assert_close(
                &format!("round {round}, call {again}"),
                to_vec(fused::matmul_rows(ta.clone(), w.clone())),
                matmul_f64(&a, &b, m, k, n),
                tol,
            );
        }
        w = w + 1.0;
        b.iter_mut().for_each(|x| *x += 1.0);
    }
}

/// `head_logprobs`-like `f(hidden, w, targets)` with per-row upstream weights: the
/// log-probabilities and the gradients of hidden and head (each `None` where it is frozen).
/// `tied`: the head is the transposed view of a `(V, d)` matrix, as a tied embedding.
fn head_run(
    f: &dyn Fn(Tensor<2>, Tensor<2>, Tensor<1, Int>) -> Tensor<1>,
    tied: bool,
    (train_h, train_w): (bool, bool),
) -> (Vec<f32>, Option<Vec<f32>>, Option<Vec<f32>>) {
    let device = default_device().autodiff();
    let (n, d, v) = (23, 12, 37);
    let mut h = tensor([n, d], 21, &device);
    if train_h {
        h = h.require_grad();
    }
    let mut w = if tied {
        tensor([v, d], 22, &device)
    } else {
        tensor([d, v], 22, &device)
    };
    if train_w {
        w = w.require_grad();
    }
    let head = if tied {
        w.clone().transpose()
    } else {
        w.clone()
    };
    let ids: Vec<i64> = (0..n as i64).map(|i| (i * 11 + 3) % v as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device);
    let g = tensor([n], 23, &device);
    let lp = f(h.clone(), head, targets);
    let grads = (lp.clone() * g).sum().backward();
    (
        to_vec(lp),
        h.grad(&grads).map(to_vec),
        w.grad(&grads).map(to_vec),
    )
}

/// A chunked run's gradients of hidden states and head against the reference's: present
/// exactly where `trained` says, and close.
fn assert_head_grads(
    what: &str,
    trained: (bool, bool),
    got: (Option<Vec<f32>>, Option<Vec<f32>>),
    want: (&Option<Vec<f32>>, &Option<Vec<f32>>),
) {
    assert_eq!(got.0.is_some(), trained.0, "dh ({what})");
    assert_eq!(got.1.is_some(), trained.1, "dw ({what})");
    for (name, g, w) in [("dh", got.0, want.0), ("dw", got.1, want.1)] {
        if let (Some(a), Some(b)) = (g, w) {
            assert_close(&format!("{name} ({what})"), a, b.clone(), 2e-5);
        }
    }
}

#[test]
fn chunked_head_logprobs_match_the_whole_logits_in_any_chunking() {
    let reference = |h: Tensor<2>, w: Tensor<2>, t: Tensor<1, Int>| {
        fused::token_logprobs_reference(h.matmul(w), t)
    };
    for tied in [false, true] {
        for trained in [(true, true), (true, false), (false, true)] {
            let want = head_run(&reference, tied, trained);
            assert_eq!(want.1.is_some(), trained.0);
            assert_eq!(want.2.is_some(), trained.1);
            // One row a chunk, uneven chunks (23 = 4 x 5 + 3), one chunk, more rows than there are.
            for rows in [1, 5, 23, 100] {
                let got = head_run(
                    &|h, w, t| fused::head_logprobs_in_chunks(h, w, t, rows),
                    tied,
                    trained,
                );
                let what = format!("tied {tied}, trained {trained:?}, {rows} rows a chunk");
                assert_close(&format!("logprobs ({what})"), got.0, want.0.clone(), 2e-5);
                assert_head_grads(&what, trained, (got.1, got.2), (&want.1, &want.2));
            }
        }
    }
}

#[test]
fn chunked_head_logprobs_and_entropy_match_the_whole_logits() {
    // lp_i + k_i H_i, weighed per row by head_run: the gradients of both outputs at once, each
    // with its own weights (a wrong entropy gradient cannot hide behind the log-probabilities').
    let n = 23;
    let want_ent = std::cell::RefCell::new(Vec::new());
    let reference = |h: Tensor<2>, w: Tensor<2>, t: Tensor<1, Int>| {
        let k = tensor([n], 24, &h.device());
        let logits = h.matmul(w);
        let ent = fused::entropy_reference(logits.clone());
        *want_ent.borrow_mut() = to_vec(ent.clone());
        fused::token_logprobs_reference(logits, t) + ent * k
    };
    for tied in [false, true] {
        for trained in [(true, true), (true, false), (false, true)] {
            let want = head_run(&reference, tied, trained);
            let want_ent = want_ent.borrow().clone();
            // An entropy near its bound would make a constant look right: these are spread.
            let (lo, hi) = want_ent
                .iter()
                .fold((f32::MAX, f32::MIN), |(lo, hi), &e| (lo.min(e), hi.max(e)));
            assert!(hi - lo > 0.3 && hi < (37f32).ln(), "entropies {lo}..{hi}");
            for rows in [1, 5, 23, 100] {
                let got_ent = std::cell::RefCell::new(Vec::new());
                let got = head_run(
                    &|h, w, t| {
                        let k = tensor([n], 24, &h.device());
                        let (lp, ent) = fused::head_logprobs_entropy_in_chunks(h, w, t, rows);
                        *got_ent.borrow_mut() = to_vec(ent.clone());
                        lp + ent * k
                    },
                    tied,
                    trained,
                );
                let what = format!("tied {tied}, trained {trained:?}, {rows} rows a chunk");
                let got_ent = got_ent.borrow().clone();
                assert_close(
                    &format!("entropy ({what})"),
                    got_ent,
                    want_ent.clone(),
                    2e-5,
                );
                assert_close(&format!("lp + k H ({what})"), got.0, want.0.clone(), 2e-5);
                assert_head_grads(&what, trained, (got.1, got.2), (&want.1, &want.2));
            }
        }
    }
}

#[test]
fn chunked_head_logprob_sum_has_the_whole_logits_value_and_gradients() {
    // Σ coef_i lp_i with its gradients computed in the forward pass, against the weighted sum
    // of the reference's log-probabilities, scaled afterwards (the backward pass's scale).
    let reference = |h: Tensor<2>, w: Tensor<2>, t: Tensor<1, Int>| {
        fused::token_logprobs_reference(h.matmul(w), t)
    };
    for tied in [false, true] {
        for trained in [(true, true), (true, false), (false, true)] {
            let want = head_run(&reference, tied, trained);
            let want_sum: f32 = {
                let g = to_vec(tensor([23], 23, &default_device()));
                want.0.iter().zip(&g).map(|(a, b)| a * b).sum()
            };
            for rows in [1, 5, 23, 100] {
                let sum = std::cell::RefCell::new(0f32);
                let got = head_run(
                    &|h, w, t| {
                        // head_run weighs the output by g and sums it: hand it the sum in one
                        // row and zeros, with g as the coefficients, so its weighting is g[0].
                        let g = tensor([23], 23, &h.device());
                        let g0 = to_vec(g.clone())[0];
                        let s = fused::head_logprob_sum_in_chunks(h, w, t, g, trained.1, rows);
                        *sum.borrow_mut() = to_vec(s.clone())[0];
                        let n = 23;
                        let rest = Tensor::<1>::zeros([n - 1], &s.device());
                        Tensor::cat(vec![s / g0 as f64, rest], 0)
                    },
                    tied,
                    trained,
                );
                let what = format!("tied {tied}, trained {trained:?}, {rows} rows a chunk");
                assert_close(
                    &format!("sum ({what})"),
                    vec![*sum.borrow()],
                    vec![want_sum],
                    2e-5,
                );
                assert_head_grads(&what, trained, (got.1, got.2), (&want.1, &want.2));
            }
        }
    }
}
