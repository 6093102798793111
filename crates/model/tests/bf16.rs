//! The bf16 matrix product (`fused::bf16`, the `bf16` matmul precision): exact products of
//! bf16-rounded inputs summed in f32, for every operand layout the linear layers and their
//! gradients use, with every micro-kernel the CPU has (AMX tiles, AVX512-BF16, portable); the
//! autodiff op against f32 products of the rounded values; a model's logits at each precision; and
//! decoding's few-rows products, which read the weight as bf16 at that precision.
//!
//! The precision is process-wide, so this file (its own test binary) is the one place that sets
//! it, under a lock.

use std::sync::Mutex;

use burn::tensor::{Tensor, TensorData};
use kiln_model::fused::bf16::{self, round_bf16, to_bf16, Kernel, Mat};
use kiln_model::fused::{self, MatmulPrecision};
use kiln_model::{default_device, to_vec, ForwardInput, Llama, LlamaConfig};

static PRECISION: Mutex<()> = Mutex::new(());

/// Deterministic values in [-1, 1).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn bf16_rounding_is_round_to_nearest_even() {
    let one = 1.0f32;
    let half_ulp = 2f32.powi(-8); // bf16 keeps 7 fraction bits
    assert_eq!(
        round_bf16(one + half_ulp),
        one,
        "a tie rounds to the even neighbour (down)"
    );
    assert_eq!(
        round_bf16(one + 3.0 * half_ulp),
        one + 4.0 * half_ulp,
        "a tie rounds to even (up)"
    );
    assert_eq!(
        round_bf16(one + 1.5 * half_ulp),
        one + 2.0 * half_ulp,
        "above the tie rounds up"
    );
    assert_eq!(round_bf16(-(one + 1.5 * half_ulp)), -(one + 2.0 * half_ulp));
    assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    assert_eq!(
        round_bf16(f32::MAX),
        f32::INFINITY,
        "past the largest bf16 rounds to inf"
    );
    assert!(round_bf16(f32::NAN).is_nan());
    assert!(
        round_bf16(f32::from_bits(0x7f80_0001)).is_nan(),
        "a NaN never becomes inf"
    );
    assert_eq!(to_bf16(3.0), 0x4040);
}

/// An `r x c` matrix stored row-major, column-major (`t`), or inside a wider buffer with a row
/// stride of `c + 5` and a column stride of 2 (`gapped`): the buffer and the view.
fn layout(v: &[f32], r: usize, c: usize, t: bool, gapped: bool) -> (Vec<f32>, isize, isize) {
    if gapped {
        let (rs, cs) = (2 * c + 5, 2);
        let mut buf = vec![f32::NAN; r * rs];
        for i in 0..r {
            for j in 0..c {
                buf[i * rs + j * cs] = v[i * c + j];
            }
        }
        (buf, rs as isize, cs as isize)
    } else if t {
        let mut buf = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                buf[j * r + i] = v[i * c + j];
            }
        }
        (buf, 1, r as isize)
    } else {
        (v.to_vec(), c as isize, 1)
    }
}

#[test]
fn bf16_gemm_is_the_f32_sum_of_exact_bf16_products_in_every_layout() {
    let kernels = Kernel::available();
    let shapes = [
        (1, 1, 1),
        (13, 7, 33),
        (37, 300, 65),
        (130, 513, 40),
        (300, 64, 100),
        // 27 rows: three 12-row panels (36 rows) outrun two 16-row transposed groups (32).
        (27, 290, 45),
        // A last panel of 8 rows, and one of 25 or 8 columns (the kernel's 8-row tiles of two
        // 16-lane groups and of one).
        (20, 50, 57),
        (20, 50, 40),
    ];
    for (si, &(m, k, n)) in shapes.iter().enumerate() {
        let (a, b) = (data(m * k, 1 + si as u64), data(k * n, 100 + si as u64));
        let c0 = data(m * n, 200 + si as u64);
        // f64 reference on the rounded inputs, and on the raw ones.
        let mut exact = vec![0f64; m * n];
        let mut raw = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let (x, y) = (a[i * k + p], b[p * n + j]);
                    exact[i * n + j] += round_bf16(x) as f64 * round_bf16(y) as f64;
                    raw[i * n + j] += x as f64 * y as f64;
                }
            }
        }
        let tol = 4e-7 * k as f64 + 1e-6;
        for (at, ag) in [(false, false), (true, false), (false, true)] {
            for (bt, bg) in [(false, false), (true, false), (false, true)] {
                for &kernel in &kernels {
                    let (abuf, ars, acs) = layout(&a, m, k, at, ag);
                    let (bbuf, brs, bcs) = layout(&b, k, n, bt, bg);
                    let am = Mat {
                        ptr: abuf.as_ptr(),
                        rs: ars,
                        cs: acs,
                    };
                    let bm = Mat {
                        ptr: bbuf.as_ptr(),
                        rs: brs,
                        cs: bcs,
                    };
                    for acc in [false, true] {
                        let mut c = c0.clone();
                        // SAFETY: the views cover their buffers; c is m x n row-major.
                        unsafe {
                            bf16::gemm(m, n, k, c.as_mut_ptr(), n as isize, acc, am, bm, kernel)
                        };
                        let what = format!(
                            "{m}x{k}x{n} a(t={at},gapped={ag}) b(t={bt},gapped={bg}) {kernel:?} acc={acc}"
                        );
                        // B packed beforehand: the same product, bit for bit.
                        let mut cp = c0.clone();
                        // SAFETY: as above.
                        unsafe {
                            let packed = bf16::pack_b_all(bm, k, n);
                            let c = cp.as_mut_ptr();
                            bf16::gemm_packed(m, c, n as isize, acc, am, &packed, kernel)
                        };
                        assert!(c == cp, "{what}: packed beforehand, another product");
                        let mut worst = 0f64;
                        for i in 0..m * n {
                            let want = exact[i] + if acc { c0[i] as f64 } else { 0.0 };
                            worst = worst.max((c[i] as f64 - want).abs());
                        }
                        assert!(worst <= tol, "{what}: off by {worst} > {tol}");
                    }
                }
            }
        }
        // C inside a wider buffer (row stride n + 5): the gap columns keep their values, so no
        // kernel writes past a tile's rows or columns.
        let cs = n + 5;
        for &kernel in &kernels {
            for acc in [false, true] {
                let mut c = vec![7.0f32; m * cs];
                for i in 0..m {
                    c[i * cs..i * cs + n].copy_from_slice(&c0[i * n..(i + 1) * n]);
                }
                let (am, bm) = (
                    Mat {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                );
                // SAFETY: a and b are m x k and k x n row-major; c holds m rows of cs.
                unsafe { bf16::gemm(m, n, k, c.as_mut_ptr(), cs as isize, acc, am, bm, kernel) };
                for i in 0..m {
                    for j in 0..cs {
                        let got = c[i * cs + j] as f64;
                        let want = if j >= n {
                            7.0
                        } else {
                            exact[i * n + j] + if acc { c0[i * n + j] as f64 } else { 0.0 }
                        };
                        assert!(
                            (got - want).abs() <= tol,
                            "{m}x{k}x{n} {kernel:?} acc={acc} c[{i}][{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
        if k >= 64 {
            // The inputs really are rounded: an f32 product would sit much closer to `raw`.
            let off = exact
                .iter()
                .zip(&raw)
                .map(|(x, y)| (x - y).abs())
                .fold(0f64, f64::max);
            assert!(
                off > 1e-3,
                "{m}x{k}x{n}: bf16 rounding changed the product by only {off}"
            );
        }
    }
}

fn rounded(shape: [usize; 2], seed: u64, device: &burn::tensor::Device) -> Tensor<2> {
    let v: Vec<f32> = data(shape[0] * shape[1], seed)
        .into_iter()
        .map(round_bf16)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

#[test]
fn bf16_matmul_op_matches_f32_products_of_rounded_values_and_gradients() {
    let device = default_device().autodiff();
    let (m, k, n) = (260, 75, 50);
    // Rounded inputs and upstream gradient: bf16 then loses nothing, and only the order of the
    // f32 sums differs from burn's f32 matmul.
    let run = |bf: bool, train_b: bool| {
        let a = rounded([m, k], 1, &device).require_grad();
        let b = rounded([k, n], 2, &device);
        let b = if train_b { b.require_grad() } else { b };
        let g = rounded([m, n], 3, &device);
        let y = if bf {
            fused::matmul_bf16(a.clone(), b.clone())
        } else {
            a.clone().matmul(b.clone())
        };
        let grads = (y.clone() * g).sum().backward();
        let db = b.grad(&grads).map(to_vec);
        (to_vec(y), to_vec(a.grad(&grads).unwrap()), db)
    };
    for train_b in [true, false] {
        let (y1, da1, db1) = run(true, train_b);
        let (y2, da2, db2) = run(false, train_b);
        for (what, x, y) in [("y", &y1, &y2), ("da", &da1, &da2)] {
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{what} (b trained: {train_b}): off by {worst}"
            );
        }
        assert_eq!(db1.is_some(), train_b, "a frozen operand gets no gradient");
        if let (Some(x), Some(y)) = (db1, db2) {
            let worst = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-3, "db: off by {worst}");
        }
    }
}

#[test]
fn bf16_precision_changes_a_models_logits_by_rounding_only() {
    let _lock = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    let device = default_device();
    let config = LlamaConfig::new(300, 64, 160, 2, 4, 2, 160);
    let model = Llama::init(&config, 7, &device).unwrap();
    let tokens: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..150).map(|i| ((i * 37 + b * 11) % 300) as u32).collect())
        .collect();
    let input = ForwardInput::causal(&tokens, &device);
    let logits = |p| {
        fused::set_matmul_precision(p);
        to_vec(model.forward(&input, None))
    };
    let f32a = logits(MatmulPrecision::F32);
    let bf = logits(MatmulPrecision::Bf16);
    let f32b = logits(MatmulPrecision::F32);
    fused::set_matmul_precision(MatmulPrecision::F32);
    assert_eq!(f32a, f32b, "back at f32, the logits are the f32 ones again");
    let worst = f32a
        .iter()
        .zip(&bf)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = f32a.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        worst < 0.05 * scale,
        "bf16 logits off by {worst} (largest logit {scale})"
    );
    if fused::enabled() && bf16::pays() {
        assert!(
            worst > 0.0,
            "bf16 was asked for and available, yet the logits are f32's"
        );
    } else {
        assert_eq!(
            bf, f32a,
            "where bf16 products do not pay, a forward pass at bf16 is f32's"
        );
    }
}

#[test]
fn bf16_packed_weight_gives_the_f32_product_of_the_rounded_weight_bit_for_bit() {
    use kiln_model::fused::skinny;
    if !skinny::available() {
        eprintln!("skipped: this CPU has no copy of the few-rows kernel");
        return;
    }
    // Row counts around the 6-row tile, column counts around the 16- and 32-column strips.
    for (m, k, n) in [
        (1, 1, 1),
        (1, 512, 600),
        (5, 37, 15),
        (7, 33, 33),
        (16, 256, 100),
    ] {
        let (a, w) = (data(m * k, 11), data(k * n, 12));
        let rounded: Vec<f32> = w.iter().map(|&x| round_bf16(x)).collect();
        // SAFETY: `a` is m x k, `w` and `rounded` are k x n, all row-major and contiguous.
        let (got, want, plain) = unsafe {
            let packed = skinny::pack_bf16(k, n, w.as_ptr(), n);
            assert!(packed.is_bf16());
            let f32_packed = skinny::pack(k, n, w.as_ptr(), n);
            assert_eq!(
                2 * packed.bytes(),
                f32_packed.bytes(),
                "bf16 holds half the bytes"
            );
            (
                skinny::matmul_packed(m, a.as_ptr(), k, &packed),
                skinny::matmul(m, k, n, a.as_ptr(), k, rounded.as_ptr(), n),
                skinny::matmul(m, k, n, a.as_ptr(), k, w.as_ptr(), n),
            )
        };
        assert_eq!(
            got, want,
            "({m},{k},{n}): not the product of the rounded weight"
        );
        if k > 1 {
            assert_ne!(got, plain, "({m},{k},{n}): the weight was not rounded");
        }
    }
}

#[test]
fn decoding_products_read_the_weight_as_bf16_at_bf16_precision_only() {
    let _lock = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    let device = default_device();
    let tensor = |v: Vec<f32>, r, c| Tensor::<2>::from_data(TensorData::new(v, [r, c]), &device);
    for (m, k, n) in [(1, 512, 600), (16, 256, 100)] {
        let (a, w) = (data(m * k, 21), data(k * n, 22));
        let rounded: Vec<f32> = w.iter().map(|&x| round_bf16(x)).collect();
        let (ta, tw) = (tensor(a, m, k), tensor(w, k, n));
        let product = |p, w: &Tensor<2>| {
            fused::set_matmul_precision(p);
            to_vec(fused::matmul_rows(ta.clone(), w.clone()))
        };
        let f32a = product(MatmulPrecision::F32, &tw);
        let of_rounded = product(MatmulPrecision::F32, &tensor(rounded, k, n));
        let bf = product(MatmulPrecision::Bf16, &tw);
        // The weight's packed copies are kept between calls: back at f32, the f32 one is read.
        let f32b = product(MatmulPrecision::F32, &tw);
        fused::set_matmul_precision(MatmulPrecision::F32);
        assert_eq!(
            f32a, f32b,
            "({m},{k},{n}): back at f32, the product is f32's again"
        );
        if fused::enabled() && bf16::native() {
            assert_eq!(
                bf, of_rounded,
                "({m},{k},{n}): bf16 decoding is not the rounded weight's product"
            );
            assert_ne!(
                bf, f32a,
                "({m},{k},{n}): bf16 was asked for and available, yet f32 ran"
            );
        } else {
            assert_eq!(
                bf, f32a,
                "({m},{k},{n}): without AVX512-BF16 the product stays f32"
            );
        }
    }
}

/// The chunked head at bf16 packs the head once for all its chunks (`bf16::pack_b_all`): over
/// three chunks it gives the log-probabilities and gradients of one chunk, bit for bit, for the
/// recomputing backward pass and the fused cross-entropy's.
#[test]
fn bf16_chunked_head_packs_the_head_once_for_the_same_products() {
    let _lock = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    let device = default_device().autodiff();
    let (n, d, v) = (600, 64, 300);
    let run = |rows: usize, sum: bool| {
        let h = rounded([n, d], 11, &device).require_grad();
        let w = rounded([d, v], 12, &device).require_grad();
        let ids: Vec<i64> = (0..n as i64).map(|i| (i * 7 + 1) % v as i64).collect();
        let t = burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
            TensorData::new(ids, [n]),
            &device,
        );
        let g = rounded([n, 1], 13, &device).reshape([n]);
        let out = if sum {
            fused::head_logprob_sum_in_chunks(h.clone(), w.clone(), t, g, true, rows)
        } else {
            (fused::head_logprobs_in_chunks(h.clone(), w.clone(), t, rows) * g).sum()
        };
        let grads = out.clone().backward();
        (
            to_vec(out),
            to_vec(h.grad(&grads).unwrap()),
            to_vec(w.grad(&grads).unwrap()),
        )
    };
    for sum in [false, true] {
        fused::set_matmul_precision(MatmulPrecision::Bf16);
        // Chunks of 256 rows (256, 256, 88: the head packed once) and one chunk of all 600.
        let (chunked, whole) = (run(256, sum), run(1000, sum));
        fused::set_matmul_precision(MatmulPrecision::F32);
        let f32 = run(1000, sum);
        assert!(
            chunked == whole,
            "sum {sum}: chunks of the packed head differ"
        );
        if fused::enabled() && bf16::pays() {
            assert!(
                whole != f32,
                "sum {sum}: bf16 asked for, yet f32's products"
            );
        } else {
            eprintln!("bf16 products do not run on this CPU: compared f32 with f32");
        }
    }
}
