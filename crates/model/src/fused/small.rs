//! The attention kernels' products: many small ones (a tile of 32 query rows against up to a few
//! hundred keys, head dimension 64), each on one thread inside a task per head.
//!
//! `gemm` packs both operands of every call into panels and dispatches through a generic driver,
//! which at these sizes costs about as much as the arithmetic: the attention of a `tiny` training
//! step ran its products at about 45% of the core's FMA peak (measured on a Zen 4). With
//! AVX-512, [`gemm`] here runs them without packing instead where the rows of both operands are
//! contiguous (the callers hand it kᵀ and vᵀ transposed once per head by [`transpose`]): A is
//! read in place, one value broadcast at a time, and a register tile of [`R`] rows by up to 64
//! columns (four 16-lane accumulators per row) sweeps C. Other CPUs and other layouts run `gemm`:
//! read in place, a transposed A (dk and dv's `dsᵀ q` and `pᵀ dout`, whose rows are columns of
//! the probabilities) costs a cache line per multiply-add step, and those products ran at 2/3 of
//! `gemm`'s speed, which packs A first (measured on a Zen 4: a `tiny` step's attention backward
//! took 25 ms this way against 15 ms with `gemm` for them).
//!
//! Written by hand for that measured cost; each product is checked against `gemm` in the tests
//! below and through every attention test.

use super::simd;

/// Rows of C per register tile.
const R: usize = 6;

/// `C = beta · A B` (`+ C` when `acc`), `A (m x k)` at `a` with row stride `a_rs` and column
/// stride `a_cs`, `B (k x n)` at `b` with strides `b_rs`, `b_cs`, C row-major with row stride
/// `c_rs`. Single-threaded.
///
/// # Safety
/// The three matrices must be valid for their shapes and strides, and `C` must not overlap A or
/// B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: isize,
    acc: bool,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    beta: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if a_cs == 1 && b_cs == 1 && simd::level() == simd::Level::V4 {
        let (a, b) = ((a, a_rs, a_cs), (b, b_rs));
        return gemm_avx512(m, n, k, (c, c_rs, acc), a, b, beta);
    }
    gemm_crate(m, n, k, c, c_rs, acc, a, a_rs, a_cs, b, b_rs, b_cs, beta);
}

/// [`gemm`] on the `gemm` crate, packing its operands.
///
/// # Safety
/// As for [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: isize,
    acc: bool,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs,
        acc,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        if acc { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `dst[j * rows + i] = src[i * rs + j * cs]` for `i < rows`, `j < cols`: the `cols x rows`
/// transpose of a strided `rows x cols` matrix, row-major (a head's keys as kᵀ, `hd x S`). Writes
/// all of `dst[..rows * cols]`, so it may start uninitialized.
///
/// # Safety
/// `src` must be valid for its shape and strides.
pub unsafe fn transpose(
    src: *const f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    dst: &mut [simd::Out],
) {
    let dst: *mut f32 = dst[..rows * cols].as_mut_ptr().cast();
    let dst_rs = rows as isize;
    // 16 x 16 tiles through a buffer on the stack: each source row's 16 values are read at
    // once (one cache line when `cs == 1`) and each output row gets 16 consecutive values.
    // Reading a column of 16 rows at a time instead kept 16 lines live that, at a row stride
    // of 4 KiB or a multiple (a weight with 1024 or 4096 columns), all fall in one set of the
    // 8-way L1 and evict each other: 6 cycles a value, measured for the head's 4096 x 256.
    #[cfg(target_arch = "x86_64")]
    let v4 = cs == 1 && simd::level() == simd::Level::V4;
    #[cfg(not(target_arch = "x86_64"))]
    let v4 = false;
    let mut tile = [[0f32; 16]; 16];
    for i0 in (0..rows).step_by(16) {
        let n = 16.min(rows - i0);
        for j0 in (0..cols).step_by(16) {
            let w = 16.min(cols - j0);
            #[cfg(target_arch = "x86_64")]
            if v4 && n == 16 && w == 16 {
                let at = |i: usize| src.offset((i0 + i) as isize * rs + j0 as isize);
                transpose16(at, |j| dst.offset((j0 + j) as isize * dst_rs + i0 as isize));
                continue;
            }
            for i in 0..n {
                let row = src.offset((i0 + i) as isize * rs + j0 as isize * cs);
                if cs == 1 {
                    let vals = std::slice::from_raw_parts(row, w);
                    for (j, &v) in vals.iter().enumerate() {
                        tile[j][i] = v;
                    }
                } else {
                    for (j, t) in tile.iter_mut().enumerate().take(w) {
                        t[i] = *row.offset(j as isize * cs);
                    }
                }
            }
            for (j, t) in tile.iter().enumerate().take(w) {
                let out = dst.offset((j0 + j) as isize * dst_rs + i0 as isize);
                std::ptr::copy_nonoverlapping(t.as_ptr(), out, n);
            }
        }
    }
}

/// A 16 x 16 tile transposed in registers ([`super::bf16::transpose16`]): row `i` read at
/// `row(i)` (16 contiguous values), column `j` written at `col(j)`; 64 shuffles for 256 values,
/// where the tile loop above moves them one at a time twice. In attention's forward pass at a
/// `tiny` step's shape (its kᵀ per head) the transpose went from 7.0% to 5.9% of the profile,
/// the rest being the first read of k from memory.
///
/// # Safety
/// Every `row(i)` must be valid for 16 reads and `col(j)` for 16 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(row: impl Fn(usize) -> *const f32, col: impl Fn(usize) -> *mut f32) {
    use std::arch::x86_64::*;
    let mut r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(row(i).cast()));
    super::bf16::transpose16(&mut r);
    for (j, v) in r.iter().enumerate() {
        _mm512_storeu_si512(col(j).cast(), *v);
    }
}

/// [`gemm`] with AVX-512: for each block of up to 64 columns, register tiles of [`R`] rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_avx512(
    m: usize,
    n: usize,
    k: usize,
    (c, c_rs, acc): (*mut f32, isize, bool),
    a: (*const f32, isize, isize),
    (b, b_rs): (*const f32, isize),
    beta: f32,
) {
    let mut j0 = 0;
    while j0 < n {
        let cols = (n - j0).min(64);
        let bj = b.add(j0);
        let cj = c.add(j0);
        // Only as many accumulators per row as the block has 16-lane groups.
        match cols.div_ceil(16) {
            1 => block::<1>(m, cols, k, (cj, c_rs, acc), a, (bj, b_rs), beta),
            2 => block::<2>(m, cols, k, (cj, c_rs, acc), a, (bj, b_rs), beta),
            3 => block::<3>(m, cols, k, (cj, c_rs, acc), a, (bj, b_rs), beta),
            _ => block::<4>(m, cols, k, (cj, c_rs, acc), a, (bj, b_rs), beta),
        }
        j0 += 64;
    }
}

/// One block of `cols <= 16 Z` columns: its rows [`R`] at a time, then the last `m % R` in one
/// tile of just that many. A tile of R over them computed rows it never stored: attention's
/// row tiles of 32 lost 4 rows in 36 that way. With the transposes' registers above, the fused
/// attention at a `tiny` step's shape took 5.76 ms forward and 16.06 ms forward and backward
/// against 6.21 and 17.00 before; at a PPO minibatch's (two packed segments), 0.38 and 1.06 ms
/// against 0.47 and 1.23 (`examples/attention_tiles.rs`, medians of 12 alternating runs, Zen 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block<const Z: usize>(
    m: usize,
    cols: usize,
    k: usize,
    (c, c_rs, acc): (*mut f32, isize, bool),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    b: (*const f32, isize),
    beta: f32,
) {
    let full = m - m % R;
    tiles::<Z, R>(full, cols, k, (c, c_rs, acc), (a, a_rs, a_cs), b, beta);
    let (c, a) = (
        c.offset(full as isize * c_rs),
        a.offset(full as isize * a_rs),
    );
    let (c, a) = ((c, c_rs, acc), (a, a_rs, a_cs));
    match m % R {
        0 => {}
        1 => tiles::<Z, 1>(m - full, cols, k, c, a, b, beta),
        2 => tiles::<Z, 2>(m - full, cols, k, c, a, b, beta),
        3 => tiles::<Z, 3>(m - full, cols, k, c, a, b, beta),
        4 => tiles::<Z, 4>(m - full, cols, k, c, a, b, beta),
        _ => tiles::<Z, 5>(m - full, cols, k, c, a, b, beta),
    }
}

/// Rows `0..m` (a multiple of `RR`) of one block of `cols <= 16 Z` columns, `RR` at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tiles<const Z: usize, const RR: usize>(
    m: usize,
    cols: usize,
    k: usize,
    (c, c_rs, acc): (*mut f32, isize, bool),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    (b, b_rs): (*const f32, isize),
    beta: f32,
) {
    use std::arch::x86_64::*;
    let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as u16 };
    let masks: [__mmask16; Z] = std::array::from_fn(|z| lanes(cols.saturating_sub(16 * z)));
    let vbeta = _mm512_set1_ps(beta);
    let mut i0 = 0;
    while i0 < m {
        let arow: [*const f32; RR] = std::array::from_fn(|r| a.offset((i0 + r) as isize * a_rs));
        let mut t = [[_mm512_setzero_ps(); Z]; RR];
        for p in 0..k {
            let bp = b.offset(p as isize * b_rs);
            let bv: [__m512; Z] =
                std::array::from_fn(|z| _mm512_maskz_loadu_ps(masks[z], bp.add(16 * z)));
            let off = p as isize * a_cs;
            for r in 0..RR {
                let av = _mm512_set1_ps(*arow[r].offset(off));
                for z in 0..Z {
                    t[r][z] = _mm512_fmadd_ps(av, bv[z], t[r][z]);
                }
            }
        }
        for (r, tr) in t.iter().enumerate() {
            let cr = c.offset((i0 + r) as isize * c_rs);
            for z in 0..Z {
                // Masked lanes are neither read nor written.
                let p = cr.wrapping_add(16 * z);
                let mut v = _mm512_mul_ps(tr[z], vbeta);
                if acc {
                    v = _mm512_add_ps(_mm512_maskz_loadu_ps(masks[z], p), v);
                }
                _mm512_mask_storeu_ps(p, masks[z], v);
            }
        }
        i0 += RR;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_data as data;

    /// Each shape and layout against `gemm`, C inside a wider buffer whose gap columns must keep
    /// their value; with and without `acc`, and a scale.
    #[test]
    fn matches_gemm_in_every_layout() {
        let shapes = [
            (1, 1, 1),
            (5, 17, 3),
            (32, 96, 64),
            (13, 64, 200),
            (7, 150, 33),
            (32, 64, 0),
            (0, 64, 8),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let a = data(m * k + 1, si as u32);
            let b = data(k * n + 1, 100 + si as u32);
            let c0 = data(m * (n + 3), 200 + si as u32);
            // A row-major or column-major; B row-major (the fast path) or column-major (`gemm`).
            for (a_rs, a_cs) in [(k as isize, 1), (1, m as isize)] {
                for (b_rs, b_cs) in [(n as isize, 1), (1, k as isize)] {
                    for acc in [false, true] {
                        let c_rs = (n + 3) as isize;
                        let (mut got, mut want) = (c0.clone(), c0.clone());
                        unsafe {
                            let (ap, bp) = (a.as_ptr(), b.as_ptr());
                            gemm(
                                m,
                                n,
                                k,
                                got.as_mut_ptr(),
                                c_rs,
                                acc,
                                ap,
                                a_rs,
                                a_cs,
                                bp,
                                b_rs,
                                b_cs,
                                0.5,
                            );
                            gemm_crate(
                                m,
                                n,
                                k,
                                want.as_mut_ptr(),
                                c_rs,
                                acc,
                                ap,
                                a_rs,
                                a_cs,
                                bp,
                                b_rs,
                                b_cs,
                                0.5,
                            );
                        }
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{m}x{n}x{k} a({a_rs},{a_cs}) b({b_rs},{b_cs}) acc={acc}: c[{i}] = {g}, gemm {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_is_the_transpose() {
        // Fewer rows and columns than a tile, and tiles plus a remainder both ways; a strided
        // source with rows of cols + 2, columns 1 apart, and one stored by columns (rows 1
        // apart, columns rows + 3 apart).
        for (rows, cols, by_columns) in [
            (5, 7, false),
            (37, 3, false),
            (40, 35, false),
            (64, 48, false),
            (19, 21, true),
        ] {
            let (rs, cs) = if by_columns {
                (1, rows + 3)
            } else {
                (cols + 2, 1)
            };
            let src = data(rows.max(cols) * rs.max(cs) * 2, 3);
            let mut dst = vec![simd::Out::new(f32::NAN); rows * cols];
            unsafe { transpose(src.as_ptr(), rows, cols, rs as isize, cs as isize, &mut dst) };
            let dst: Vec<f32> = dst.iter().map(|x| unsafe { x.assume_init() }).collect();
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(
                        dst[j * rows + i],
                        src[i * rs + j * cs],
                        "({rows}, {cols}) {i} {j}"
                    );
                }
            }
        }
    }
}
