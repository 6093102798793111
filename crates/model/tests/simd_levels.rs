//! The row primitives of `fused::simd` are compiled once per instruction-set level (baseline,
//! AVX2 + FMA, AVX-512) and picked at run time. Every copy must compute the same bits: the levels
//! differ in speed only. This test runs each primitive at every level this CPU has and compares.
//!
//! Its own test binary: it caps the process-wide level, which other tests must not see change
//! under them.

use kiln_model::fused::simd::{self, AdamWStep, Level};

/// Deterministic values in about [-3, 3], with some large negatives (masked scores).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % 29 == 5 {
                -1e30
            } else {
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
            }
        })
        .collect()
}

/// A NaN that no primitive computes: an output buffer starts as it, and none may be left so.
const UNWRITTEN: u32 = 0x7fc0_dead;

/// An output buffer for the primitives that write `MaybeUninit` rows (here initialized to
/// [`UNWRITTEN`], so that it can be read whether or not a primitive wrote it).
fn fresh(n: usize) -> Vec<simd::Out> {
    vec![simd::Out::new(f32::from_bits(UNWRITTEN)); n]
}

/// The values of a [`fresh`] buffer; panics where an element was not written.
fn read(v: &[simd::Out], what: &str) -> Vec<f32> {
    v.iter()
        .enumerate()
        .map(|(i, x)| {
            // SAFETY: every element was initialized by `fresh` or written since.
            let x = unsafe { x.assume_init() };
            assert_ne!(x.to_bits(), UNWRITTEN, "{what} left element {i} unwritten");
            x
        })
        .collect()
}

/// Every primitive's outputs, in one list of bit patterns, for rows of length `n`.
fn run_all(n: usize) -> Vec<u32> {
    let (a, b, c) = (data(n, 1), data(n, 2), data(n, 3));
    let pos: Vec<f32> = c.iter().map(|x| x.abs().min(3.0) + 0.1).collect();
    let mut out = Vec::new();
    let mut push = |v: &[f32]| out.extend(v.iter().map(|x| x.to_bits()));

    push(&[
        simd::max(&a),
        simd::sum_exp_shift(&a, 1.5),
        simd::dot(&a, &b),
        simd::sum_exp_shift_dot(&a, 1.5).0,
        simd::sum_exp_shift_dot(&a, 1.5).1,
    ]);
    push(&[simd::dot3(&a, &b, &c)]);
    let mut x = a.clone();
    let s = simd::exp_shift_sum(&mut x, 2.0);
    push(&x);
    push(&[s]);
    simd::scale(&mut x, 0.37);
    simd::add(&mut x, &b);
    simd::axpy(&mut x, -1.25, &c);
    push(&x);
    let mut p = pos.clone();
    simd::softmax_grad(&mut p, &b, 0.3, 0.125);
    push(&p);
    let mut l = b.clone();
    simd::neg_softmax_scaled(&mut l, 2.5, 0.75);
    push(&l);
    let mut y = fresh(n);
    simd::silu_mul(&b, &c, &mut y);
    push(&read(&y, "silu_mul"));
    let (mut dg, mut du) = (fresh(n), fresh(n));
    simd::silu_mul_grad(&a, &b, &c, &mut dg, &mut du);
    push(&read(&dg, "silu_mul_grad"));
    push(&read(&du, "silu_mul_grad"));
    let mut y = fresh(n);
    simd::norm_row(&mut y, &b, &c, 0.81);
    push(&read(&y, "norm_row"));
    let (mut dx, mut dw) = (fresh(n), c.clone());
    simd::norm_row_grad(&mut dx, &mut dw, &a, &b, &c, 0.81, 0.02);
    push(&read(&dx, "norm_row_grad"));
    push(&dw);
    let half = n / 2 * 2;
    for transpose in [false, true] {
        let mut r = fresh(half);
        simd::rope_row(&mut r, &b[..half], &c[..half], &a[..half], transpose);
        push(&read(&r, "rope_row"));
    }
    let (mut w, mut m, mut v) = (b.clone(), a.clone(), pos.clone());
    let step = AdamWStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 0.1,
        bc1: 0.19,
        bc2: 0.0975,
        grad_scale: 0.5,
    };
    simd::adamw(&mut w, &mut m, &mut v, &c, step);
    push(&w);
    push(&m);
    push(&v);
    out
}

#[test]
fn every_level_computes_the_same_bits() {
    let detected = simd::detected();
    let levels: Vec<Level> = [Level::Baseline, Level::V3, Level::V4]
        .into_iter()
        .filter(|&l| l as u8 <= detected as u8)
        .collect();
    if levels.len() == 1 {
        eprintln!("only the baseline copy runs on this CPU: nothing to compare it with");
    }
    // Lengths that leave every remainder of the 16 partial sums, and a vocabulary-sized row.
    for n in [1, 7, 16, 33, 64, 255, 4099] {
        let mut reference: Option<(Level, Vec<u32>)> = None;
        for &l in &levels {
            simd::set_max_level(Some(l));
            assert_eq!(simd::level(), l, "the cap did not take");
            let got = run_all(n);
            match &reference {
                None => reference = Some((l, got)),
                Some((rl, want)) => {
                    let first = want.iter().zip(&got).position(|(a, b)| a != b);
                    assert!(
                        first.is_none(),
                        "n = {n}: {l:?} differs from {rl:?} at output {first:?}: {} vs {}",
                        f32::from_bits(got[first.unwrap()]),
                        f32::from_bits(want[first.unwrap()])
                    );
                }
            }
        }
    }
    simd::set_max_level(None);
    assert_eq!(simd::level(), detected);
}
