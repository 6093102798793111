//! f32 matrix products with AVX-512: the linear layers' products, forward and backward, in
//! place of the `gemm` crate on the CPUs where that was measured faster ([`available`]: AMD's
//! with AVX-512; `KILN_SGEMM=1` or `0` decides elsewhere).
//!
//! Written by hand for a measured end-to-end gain, not for the micro-kernel: `gemm` runs these
//! shapes as fast (`examples/sgemm_shapes.rs`, product by product, alternating: 0.82-1.15x of
//! `gemm`, most within 5%). What differs is the work around it. `gemm` gathers a B whose columns
//! are contiguous (`Wᵀ` in an input's gradient `dy Wᵀ`) one value at a time, so Kiln copied it
//! into rows first (`kernels::rows_of`), and packs both operands on every call; here the
//! transposed weight is packed straight from its columns through 16 x 16 register transposes, A
//! is read in place where its rows are contiguous, and the packed block of B is kept between
//! products. On a Zen 4 (2 cores), two rounds of six alternating pairs of `kiln bench` with and
//! without `KILN_SGEMM=0`: a PPO update at TRL's shapes 3.28 / 3.23 -> 3.19 / 3.18 s (medians;
//! faster in 11 of the 12 pairs), a `tiny` training step even (+0.2-2%); a step's packing of B
//! and transposes 6.6% -> 3.2% of the profile. A product of a few rows packs the whole weight
//! for them, so `kernels::matmul` keeps those (under 128) on `gemm`.
//!
//! The layout is BLIS's (Van Zee & van de Geijn 2015), turned for a row-major C. B is packed a
//! block of rows at a time ([`KC`] of them, or up to [`KC_MAX`] where A's rows are read in place:
//! [`block_k`]) into panels of [`NR`] columns (64 consecutive values for each k); the
//! micro-kernel computes an [`MR`] x [`NR`] tile of C (six rows, four 16-lane registers
//! each: 24 accumulators), broadcasting one value of A per row and multiply-adding it into the
//! panel's four registers (on cache-resident panels: 96-99% of a core's FMA peak); at C's edges
//! a smaller tile, of just the rows (in twos) and 16-lane groups it stores. A is read in
//! place where its rows are contiguous (`x W`, `dy Wᵀ`): the six rows' values at a k lie in six
//! cache lines that serve the next 15 k as well. Where its columns are contiguous (`xᵀ dy`, a
//! weight's gradient) the six values of a k are adjacent in one cache line: read there too where
//! B is at most [`T_IN_PLACE_PANELS`] panels wide, and otherwise (a head's gradient) copied,
//! [`MR`] rows by [`KC`], into a small panel first, which stays in L1 while the tile sweeps the
//! row's panels of B. Each
//! task owns a block of C's rows and sweeps, for each micro-panel of A, every panel of B.
//!
//! Checked against the exact product in every layout and at uneven sizes in the tests below
//! (wherever the CPU has AVX-512), and through every model test (gradient checks, golden values
//! from PyTorch) where it runs by default.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::bf16::{Mat, OutPtr};

/// Rows of a C tile.
pub const MR: usize = 6;
/// Columns of a C tile (four 16-lane registers).
pub const NR: usize = 64;
/// Values of k per packed block of B (the most where A is copied: [`block_k`]).
pub const KC: usize = 256;

/// Most values of k per block where A is read in place ([`block_k`]).
const KC_MAX: usize = 1536;

/// Most bytes of a packed block of B of more than [`KC`] values of k ([`block_k`]): 8 MiB, the
/// largest measured (a `small` head's 512 x 4,096 columns: 2% faster than two blocks). Larger
/// blocks were not measured, so a wider B keeps shorter ones.
const PACKED_MAX: usize = 8 << 20;

/// Most panels of B (of [`NR`] columns) packed at once: 4,096 columns, a packed block of 4 MiB.
/// A wider product (a 32k-token head) runs block of columns by block, each packed in turn, so
/// the packed copy kept between products on each calling thread stays 4 MiB rather than 32. Its
/// speed did not change (the head's three products at a 32,000-token vocabulary: within 3%).
const NC_PANELS: usize = 64;

/// Most panels of B (of [`NR`] columns) for which a transposed A (`xᵀ` in a weight's gradient
/// `xᵀ dy`) is read in place rather than copied a micro-panel at a time: the six values of a k
/// are adjacent in x's row, so the micro-kernel broadcasts them from there, a cache line per k
/// (16 KB for [`KC`] values, kept in L1 while the tile sweeps B's panels). Across a wider B (a
/// head's 4,096 columns) those lines fall out of L1 between panels, and the copy was faster
/// (one thread: the head's `xᵀ dy` 99-102 -> 97-100 GFLOP/s in place; `tiny`'s q, k, v, o 96-98
/// -> 98-102, gate and up 99-102 -> 100-103, down 99-100 -> 104-105). In a `tiny` half-batch's
/// forward and backward pass: median pair ratios 1.001-1.013 over 4 runs, at the edge of what
/// that measurement resolves (its A/A runs: 0.993-1.011; docs/performance.md, "An eighteenth
/// session").
const T_IN_PLACE_PANELS: usize = 16;

/// Rows of C per task: as many near-equal blocks of about this many as a multiple of the threads
/// ([`super::row_blocks`]), so that two threads get the same work (a weight's gradient has 256
/// or 688 rows).
const MC: usize = 192;

/// Whether this CPU can run these products: AVX-512, not capped by `KILN_SIMD`.
pub fn supported() -> bool {
    super::simd::level() == super::simd::Level::V4
}

/// Whether Kiln's f32 products run here rather than on `gemm`: on AMD CPUs with AVX-512, where
/// they were measured faster (Zen 4); elsewhere (Intel's AVX-512 cores, whose two FMA ports and
/// memory differ) they have not been measured, so `gemm` keeps them unless `KILN_SGEMM=1`.
/// `KILN_SGEMM=0` hands every f32 product back to `gemm`.
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        supported()
            && match std::env::var("KILN_SGEMM").as_deref() {
                Ok("0") => false,
                Ok("1") => true,
                _ => amd(),
            }
    })
}

/// Whether the CPU's vendor is AMD (cpuid leaf 0: "AuthenticAMD").
fn amd() -> bool {
    let id = __cpuid(0);
    let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    vendor == b"AuthenticAMD"
}

thread_local! {
    /// The packed block of B, kept between products so that a step does not allocate it again
    /// for each of them. (A nested product on the same thread finds it taken and allocates.)
    static PACKED_B: std::cell::Cell<Vec<f32>> = Default::default();
}

/// `C = A B` for `A (m x k)`, `B (k x n)` with any strides and C row-major with row stride
/// `c_rs`, which is written without being read (it may start uninitialized). Runs on rayon's
/// pool. `k` must be at least 1.
///
/// # Safety
/// [`supported`] must hold; the three matrices must be valid for their shapes and strides, and
/// C must not overlap A or B.
pub unsafe fn gemm(m: usize, n: usize, k: usize, c: *mut f32, c_rs: isize, a: Mat, b: Mat) {
    gemm_acc(m, n, k, c, c_rs, a, b, false)
}

/// [`gemm`], or with `acc`, `C += A B` (C read and added to: the chunked head's weight
/// gradient, summed over its chunks without a pass of its own).
///
/// # Safety
/// As [`gemm`]; with `acc`, C must be initialized.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_acc(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: isize,
    a: Mat,
    b: Mat,
    acc: bool,
) {
    debug_assert!(supported() && k > 0);
    if m == 0 || n == 0 {
        return;
    }
    let panels = n.div_ceil(NR);
    if panels > NC_PANELS {
        // Near-equal blocks of columns, each a product of its own (C's and B's columns there).
        let width = panels.div_ceil(panels.div_ceil(NC_PANELS)) * NR;
        for c0 in (0..n).step_by(width) {
            let b0 = Mat {
                ptr: b.ptr.offset(c0 as isize * b.cs),
                ..b
            };
            columns(m, width.min(n - c0), k, c.add(c0), c_rs, a, b0, acc);
        }
    } else {
        columns(m, n, k, c, c_rs, a, b, acc);
    }
}

/// [`gemm_acc`] for at most [`NC_PANELS`] panels of columns.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: isize,
    a: Mat,
    b: Mat,
    acc: bool,
) {
    let npan = n.div_ceil(NR);
    let step = block_k(k, n, a.cs == 1);
    let big = m * n * k >= 1 << 18;
    let threads = if big { rayon::current_num_threads() } else { 1 };
    let (mblocks, block_rows) = super::row_blocks(m, MR, MC, threads);
    // Fewer row blocks than threads (a product of a few rows): the columns are split too.
    let nchunks = threads.div_ceil(mblocks).min(npan);
    let chunk = npan.div_ceil(nchunks);
    let c = OutPtr(c);
    let mut packed = PACKED_B.with(|s| s.take());
    if packed.len() < npan * step * NR {
        packed = vec![0.0; npan * step * NR];
    }
    let bpack = OutPtr(packed.as_mut_ptr());
    // One block of `step` rows of B at a time: packed, then every tile's share of it, so that
    // the packed copy is a block (4 MB for a 4096-word head), not all of B.
    for k0 in (0..k).step_by(step) {
        let kc = step.min(k - k0);
        let pack = |j: usize| {
            let b: Mat = b;
            // SAFETY: panel j of this block lies inside `packed`; the reads stay inside B.
            unsafe {
                pack_b(
                    b,
                    k0,
                    kc,
                    j * NR,
                    NR.min(n - j * NR),
                    bpack.get().add(j * kc * NR),
                );
            }
        };
        if big && npan > 1 {
            (0..npan).into_par_iter().for_each(pack);
        } else {
            (0..npan).for_each(pack);
        }
        let task = |t: usize| {
            let a: Mat = a;
            let (mb, nb) = (t / nchunks, t % nchunks);
            let (m0, rows) = block_rows(mb);
            let cols = nb * chunk..((nb + 1) * chunk).min(npan);
            let block = Block {
                n,
                k0,
                kc,
                acc,
                c: c.get(),
                c_rs,
                b: bpack.get(),
            };
            // SAFETY: this task writes rows m0..m0 + rows, panels `cols` of C, and nothing else.
            unsafe { block.rows(a, m0, rows, cols) };
        };
        let tasks = mblocks * nchunks;
        if tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
    PACKED_B.with(|s| s.set(packed));
}

/// Values of k per block of a product of `k` by `n` columns: near-equal blocks (832 = 4 x 208,
/// not 3 x 256 + 64) of at most [`KC`], or, where A is read in place (its rows contiguous), of
/// up to [`KC_MAX`], as long as the packed block stays within [`PACKED_MAX`]. Longer blocks
/// read and add to C fewer times: `x W` of `tiny`'s down projection and `dy Wᵀ` of its gate and
/// up (k = 688) in one block, not three, `dy Wᵀ` of its head in 3, not 16, `small`'s (k = 512,
/// 1,376) in one. Those products ran 3-10% faster (`examples/sgemm_shapes.rs`, fastest rounds:
/// `small`'s 210-220 GFLOP/s against 197-207). A weight's gradient `xᵀ dy`, whose transposed A
/// is copied a micro-panel at a time (or read a cache line per k, [`T_IN_PLACE_PANELS`]),
/// measured no faster with longer blocks and keeps [`KC`] (its copy of A is sized for it, and
/// read in place, KC lines of it fill half of L1).
fn block_k(k: usize, n: usize, a_rows: bool) -> usize {
    let most = if a_rows {
        let width = n.min(NC_PANELS * NR).next_multiple_of(NR);
        (PACKED_MAX / (4 * width)).clamp(KC, KC_MAX)
    } else {
        KC
    };
    k.div_ceil(k.div_ceil(most))
}

/// One block of values of k: where its packed B is and where C goes.
struct Block {
    n: usize,
    k0: usize,
    kc: usize,
    /// C is added to from the first block on.
    acc: bool,
    c: *mut f32,
    c_rs: isize,
    /// The block's packed panels of B, `kc x NR` each.
    b: *const f32,
}

impl Block {
    /// Rows `m0..m0 + rows` of C, B's panels `cols`: for each micro-panel of A, every panel.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows(&self, a: Mat, m0: usize, rows: usize, cols: std::ops::Range<usize>) {
        let (k0, kc) = (self.k0, self.kc);
        // A block after the first adds to C instead of writing it.
        let add = self.acc || k0 > 0;
        // A's rows contiguous: read in place. Its columns contiguous (`xᵀ`, a weight's gradient)
        // and B at most [`T_IN_PLACE_PANELS`] panels wide: read in place too. Otherwise each
        // micro-panel is copied into `apack` (only then allocated and zeroed).
        let in_place = a.cs == 1 || (a.rs == 1 && self.n <= T_IN_PLACE_PANELS * NR);
        debug_assert!(
            a.cs == 1 || kc <= KC,
            "a transposed A's blocks of k are at most KC long (block_k)"
        );
        let mut apack = if in_place {
            None
        } else {
            Some([0f32; MR * KC])
        };
        for r0 in (m0..m0 + rows).step_by(MR) {
            let live = MR.min(m0 + rows - r0);
            let from = a.ptr.offset(r0 as isize * a.rs + k0 as isize * a.cs);
            let (ap, ars, acs) = match apack.as_mut() {
                None => (from, a.rs, a.cs),
                Some(apack) => {
                    pack_a(from, a.rs, a.cs, live, kc, apack);
                    (apack.as_ptr(), 1, MR as isize)
                }
            };
            for j in cols.clone() {
                let c = self.c.offset(r0 as isize * self.c_rs + (j * NR) as isize);
                let b = self.b.add(j * kc * NR);
                let tile = (live, NR.min(self.n - j * NR));
                let args = (kc, (ap, ars, acs), b, (c, self.c_rs), tile, add);
                // A last, narrower panel multiply-adds only its 16-lane groups that hold
                // columns (`tiny`'s 688 columns end in a panel of 48, `small`'s 1,376 in 32),
                // and a last micro-panel of A only its rows, in twos (256 rows end in 4).
                match (live.div_ceil(2), tile.1.div_ceil(16)) {
                    (3, 4) => kernel::<MR, 4>(args),
                    (3, 3) => kernel::<MR, 3>(args),
                    (3, 2) => kernel::<MR, 2>(args),
                    (3, _) => kernel::<MR, 1>(args),
                    (2, 4) => kernel::<4, 4>(args),
                    (2, 3) => kernel::<4, 3>(args),
                    (2, 2) => kernel::<4, 2>(args),
                    (2, _) => kernel::<4, 1>(args),
                    (_, 4) => kernel::<2, 4>(args),
                    (_, 3) => kernel::<2, 3>(args),
                    (_, 2) => kernel::<2, 2>(args),
                    (_, _) => kernel::<2, 1>(args),
                }
            }
        }
    }
}

/// The `live x kc` values of A at `from` (row stride `rs`, column stride `cs`) into `out`, `MR`
/// values for each k (rows past `live` are not written and never stored from).
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(from: *const f32, rs: isize, cs: isize, live: usize, kc: usize, out: &mut [f32]) {
    let out = &mut out[..kc * MR];
    if rs == 1 {
        // Columns contiguous (`xᵀ`): the rows' values at each k are adjacent.
        let mask: __mmask16 = ((1u32 << live) - 1) as u16;
        for p in 0..kc {
            let v = _mm512_maskz_loadu_ps(mask, from.offset(p as isize * cs));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(p * MR), mask, v);
        }
    } else {
        for p in 0..kc {
            for r in 0..live {
                out[p * MR + r] = *from.offset(r as isize * rs + p as isize * cs);
            }
        }
    }
}

/// Rows `k0..k0 + kc`, columns `c0..c0 + cols` of B into a panel at `dst`: `NR` values for each
/// k, the columns past `cols` zero.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(b: Mat, k0: usize, kc: usize, c0: usize, cols: usize, dst: *mut f32) {
    if b.cs == 1 {
        // Rows contiguous (a weight, `dy`): a copy of each row's 64 values.
        let masks = col_masks(cols);
        for p in 0..kc {
            let src = b.ptr.offset((k0 + p) as isize * b.rs + c0 as isize);
            let d = dst.add(p * NR);
            for (z, &mask) in masks.iter().enumerate() {
                _mm512_storeu_ps(d.add(16 * z), _mm512_maskz_loadu_ps(mask, src.add(16 * z)));
            }
        }
    } else if b.rs == 1 {
        // Columns contiguous (`Wᵀ` in an input's gradient): 16 columns by 16 values of k at a
        // time, transposed in registers, so each store is one row of 16 (gathering them one at
        // a time was most of `gemm`'s packing for these products).
        let mut v = [_mm512_setzero_si512(); 16];
        for g in 0..NR / 16 {
            for p0 in (0..kc).step_by(16) {
                let len = (kc - p0).min(16);
                let mask: __mmask16 = ((1u32 << len) - 1) as u16;
                for (cc, v) in v.iter_mut().enumerate() {
                    let col = 16 * g + cc;
                    *v = if col < cols {
                        let x = b
                            .ptr
                            .offset((k0 + p0) as isize + (c0 + col) as isize * b.cs);
                        _mm512_castps_si512(_mm512_maskz_loadu_ps(mask, x))
                    } else {
                        _mm512_setzero_si512()
                    };
                }
                super::bf16::transpose16(&mut v);
                for (q, v) in v.iter().enumerate().take(len) {
                    _mm512_storeu_si512(dst.add((p0 + q) * NR + 16 * g) as *mut _, *v);
                }
            }
        }
    } else {
        for p in 0..kc {
            for col in 0..NR {
                *dst.add(p * NR + col) = if col < cols {
                    *b.ptr
                        .offset((k0 + p) as isize * b.rs + (c0 + col) as isize * b.cs)
                } else {
                    0.0
                };
            }
        }
    }
}

/// Lane masks of the four 16-lane groups of `cols <= NR` columns.
#[inline(always)]
fn col_masks(cols: usize) -> [__mmask16; 4] {
    std::array::from_fn(|z| super::bf16::mask16(cols.saturating_sub(16 * z)))
}

/// The `R x 16 Z` tile (`R` of a micro-panel's [`MR`] rows and `Z` of a panel's four 16-lane
/// groups, those that hold its `rows` and `cols`): A's value at (r, p) at `a + r * ars + p *
/// acs`, B a packed panel (rows [`NR`] apart); the first `rows` rows and `cols` columns are
/// written to C (added with `add`) from the registers, under masks. Rows past `rows` (at most
/// one) repeat the last one: computed, never stored.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::type_complexity)]
unsafe fn kernel<const R: usize, const Z: usize>(
    (kc, (a, ars, acs), b, (c, c_rs), (rows, cols), add): (
        usize,
        (*const f32, isize, isize),
        *const f32,
        (*mut f32, isize),
        (usize, usize),
        bool,
    ),
) {
    debug_assert!(rows <= R && R <= MR && cols <= 16 * Z);
    let arow: [*const f32; R] = std::array::from_fn(|r| a.offset(r.min(rows - 1) as isize * ars));
    let mut t = [[_mm512_setzero_ps(); Z]; R];
    let mut off = 0isize;
    for p in 0..kc {
        let bp = b.add(p * NR);
        let bv: [__m512; Z] = std::array::from_fn(|z| _mm512_loadu_ps(bp.add(16 * z)));
        for (r, tr) in t.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*arow[r].offset(off));
            for (acc, &bz) in tr.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(av, bz, *acc);
            }
        }
        off += acs;
    }
    let masks = col_masks(cols);
    for (r, tr) in t.iter().enumerate().take(rows) {
        let cr = c.offset(r as isize * c_rs);
        for (z, (&v, &mask)) in tr.iter().zip(&masks).enumerate() {
            // Masked lanes are neither read nor written (they may lie past C).
            let p = cr.wrapping_add(16 * z);
            let v = if add {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), v)
            } else {
                v
            };
            _mm512_mask_storeu_ps(p, mask, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::kernels;
    use crate::fused::test_data as data;

    /// [`gemm`] where the CPU has AVX-512 (whether or not Kiln runs it by default there), else
    /// the `gemm` crate as Kiln calls it instead ([`kernels::gemm_into`]).
    unsafe fn product(m: usize, n: usize, k: usize, c: &mut [f32], c_rs: usize, a: Mat, b: Mat) {
        if supported() {
            return gemm(m, n, k, c.as_mut_ptr(), c_rs as isize, a, b);
        }
        let par = gemm::Parallelism::Rayon(0);
        kernels::gemm_into(m, n, k, c.as_mut_ptr(), c_rs as isize, a, b, par);
    }

    /// Every layout of A and B (rows contiguous, columns contiguous, neither) at sizes that
    /// leave partial tiles, panels and k blocks, and at sizes that run on several threads,
    /// against sums in f64; C inside a wider buffer whose gap columns must keep their value.
    #[test]
    fn matches_the_exact_product_in_every_layout() {
        if !supported() {
            eprintln!("no AVX-512 on this CPU: checking the `gemm` crate, which Kiln runs instead");
        }
        let shapes = [
            (1, 1, 1),
            (5, 17, 3),
            (6, 64, 256),
            (13, 130, 257),
            (100, 70, 600),
            (257, 200, 33),
            (700, 65, 40),
            // Blocks longer than KC where A is read in place, the last one shorter.
            (20, 100, 1601),
            // B wider than T_IN_PLACE_PANELS: a transposed A is copied, not read in place.
            (13, T_IN_PLACE_PANELS * NR + 70, 40),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let a = data(2 * m * k + 2 * m + 2 * k, si as u32);
            let b = data(2 * k * n + 2 * k + 2 * n, 100 + si as u32);
            let layouts = |rows: usize, cols: usize| {
                [
                    (cols as isize, 1),
                    (1, rows as isize),
                    (2 * cols as isize + 1, 2),
                ]
            };
            for (a_rs, a_cs) in layouts(m, k) {
                for (b_rs, b_cs) in layouts(k, n) {
                    let c_rs = n + 3;
                    let mut got = vec![7.5f32; m * c_rs];
                    let am = Mat {
                        ptr: a.as_ptr(),
                        rs: a_rs,
                        cs: a_cs,
                    };
                    let bm = Mat {
                        ptr: b.as_ptr(),
                        rs: b_rs,
                        cs: b_cs,
                    };
                    unsafe { product(m, n, k, &mut got, c_rs, am, bm) };
                    let at =
                        |r: usize, c: usize| a[(r as isize * a_rs + c as isize * a_cs) as usize];
                    let bt =
                        |r: usize, c: usize| b[(r as isize * b_rs + c as isize * b_cs) as usize];
                    for i in 0..m {
                        for j in 0..c_rs {
                            let g = got[i * c_rs + j];
                            let want = if j < n {
                                (0..k)
                                    .map(|p| at(i, p) as f64 * bt(p, j) as f64)
                                    .sum::<f64>()
                            } else {
                                7.5
                            };
                            assert!(
                                (g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{m}x{k}x{n} a({a_rs},{a_cs}) b({b_rs},{b_cs}): c[{i}][{j}] = {g}, exact {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn adds_into_c_and_runs_wide_products_block_by_block() {
        if !supported() {
            eprintln!("no AVX-512 on this CPU: nothing to check");
            return;
        }
        // Wider than a block of columns (64 panels of 64), evenly and not; B read in place and
        // transposed (a head's Wᵀ), and C added to.
        for (si, &(m, n, k)) in [(13, 4200, 40), (7, 8300, 300)].iter().enumerate() {
            let a = data(m * k, 300 + si as u32);
            let b = data(k * n, 400 + si as u32);
            let c0 = data(m * n, 500 + si as u32);
            for (b_rs, b_cs) in [(n as isize, 1), (1, k as isize)] {
                for acc in [false, true] {
                    let mut got = c0.clone();
                    let am = Mat {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    };
                    let bm = Mat {
                        ptr: b.as_ptr(),
                        rs: b_rs,
                        cs: b_cs,
                    };
                    unsafe { gemm_acc(m, n, k, got.as_mut_ptr(), n as isize, am, bm, acc) };
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|p| {
                                    a[i * k + p] as f64
                                        * b[(p as isize * b_rs + j as isize * b_cs) as usize] as f64
                                })
                                .sum();
                            let want = dot + if acc { c0[i * n + j] as f64 } else { 0.0 };
                            let g = got[i * n + j] as f64;
                            assert!(
                                (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{m}x{k}x{n} b({b_rs},{b_cs}) acc {acc}: c[{i}][{j}] = {g}, exact {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
