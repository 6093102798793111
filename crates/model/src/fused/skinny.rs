//! Matrix products with few rows, `x (M, K) · w (K, N)` for M in [`ROWS`] (and fewer rows, see
//! [`takes`]): a decoding step's linear layers, one row per sequence of the batch.
//!
//! Written by hand because burn's `flex` matmul runs products under 192³ multiply-adds on one
//! thread, so in a batch-16 decoding step every layer's product left the second core idle (a
//! profile on an AVX2 CPU: `gemm` 55% of the step). On one thread this kernel runs at `gemm`'s
//! speed (0.9-1.2x on the layer shapes, `examples/skinny_bench.rs`); its gain is that it splits
//! the columns between the cores without `gemm`'s per-call packing of the whole weight.
//!
//! Here the weight is read in place, row by row (its rows are the `K` dimension, contiguous along
//! `N`, as burn stores a linear layer's weight), by a register-blocked tile of `R` rows of C by
//! `NR` columns kept in vector registers for the whole sum over k. Each thread (the caller and
//! [`team`]'s helpers) owns a range of column tiles, so the weight is streamed once in all and
//! the threads share no output. Every product sums over k in order with fused multiply-adds, one
//! chain per output: the result does not depend on the number of threads.
//!
//! The tile loops are plain Rust that LLVM keeps in registers and vectorizes when compiled with
//! AVX2 + FMA (8 lanes: `R` = 6 rows by 16 columns, 12 registers of sums) or AVX-512 (16 lanes:
//! 6 by 32). A CPU with neither uses `gemm` (see [`available`]).
//!
//! At the `bf16` matmul precision a weight can be packed as bf16 ([`pack_bf16`]): half the bytes
//! to stream, which is what a batch-1 decoding step waits on once the model outgrows L2. The
//! tile widens each bf16 exactly to f32 (a 16-bit shift) and runs the same f32 multiply-adds, so
//! the product is bit for bit the f32 product with the weight rounded to bf16.

use rayon::prelude::*;

use super::bf16::OutPtr as Out;
use super::simd::{self, Level};
use super::team;

/// The rows from which a product always runs here, as measured end to end on batched decoding
/// (see docs/performance.md): at 16 and 32 rows this kernel on both cores beat burn's one-thread
/// `gemm` (+35-48% and +5-40% tokens/s). At 64 rows (a PPO rollout of 64 prompts) `gemm` runs on
/// every core but packs the whole weight at every call, which this kernel's packed copy does
/// not: a rollout at TRL's shapes (`kiln-engine`'s `examples/rollout.rs`, 64 x 32 tokens) took
/// 308 ms with `gemm` there against 278 ms here (medians of eight alternating runs on a Zen 4;
/// faster in seven). Fewer rows run here from a weight of [`ONE_ROW_MIN_WEIGHT`].
pub const ROWS: std::ops::RangeInclusive<usize> = 16..=64;

/// The weights (`K · N` elements) from which a product of fewer than [`ROWS`] rows (decoding at
/// batch 1 to 15) runs here, split between the cores, rather than in `gemm` on one thread:
/// 128 KiB, where half the product takes about as long as handing it to a [`team`] helper
/// (1-2 µs). Such a product reads the weight about once, so it is bound by the bandwidth of
/// memory or L2, which one core cannot use alone (measured on a 2-core Xeon VM: 8-9 GB/s from
/// one thread, 17-22 GB/s from two). With rayon's pool the threshold had to be 1 MiB: waking
/// its worker cost 25-40 µs. Alternating, `small` decoded 1.3-2.1x faster at batch 2 to 12 with
/// the team's helpers, and `tiny`, whose layers are under 1 MiB, 1.2x at batch 1 at this
/// threshold against 1 MiB.
pub const ONE_ROW_MIN_WEIGHT: usize = 1 << 15;

/// Whether `x (M, K) · w (K, N)` runs here: M in [`ROWS`], or fewer rows and a weight of at
/// least [`ONE_ROW_MIN_WEIGHT`].
pub fn takes(m: usize, k: usize, n: usize) -> bool {
    m <= *ROWS.end() && (m >= *ROWS.start() || (m > 0 && k * n >= ONE_ROW_MIN_WEIGHT))
}

/// Whether the CPU has a copy of the kernel (x86-64-v3 or better).
pub fn available() -> bool {
    simd::level() != Level::Baseline
}

/// A row-major operand: element (r, c) at `ptr + r * rs + c`.
struct Rows<T = f32> {
    ptr: *const T,
    rs: usize,
}
impl<T> Rows<T> {
    fn new(ptr: *const T, rs: usize) -> Self {
        Rows { ptr, rs }
    }
}
impl<T> Clone for Rows<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Rows<T> {}
unsafe impl<T> Send for Rows<T> {}
unsafe impl<T> Sync for Rows<T> {}

/// An element of a weight as the tile reads it: f32, or bf16 (`u16`, the upper half of an f32's
/// bits), widened exactly.
trait Elem: Copy + Default + Send + Sync {
    fn f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// How far ahead of its reads (bytes) a one-row tile prefetches its weight strip. The strip is
/// one contiguous run, but the hardware prefetcher alone left a batch-1 decoding step's products
/// short of the memory's bandwidth (`examples/decode_products.rs`, alternating on a 2-core Xeon:
/// f32 +1-3%, bf16 +10-20%; 512 and 2048 bytes ahead measured no better).
const PREFETCH_AHEAD: usize = 1024;

/// One tile: C[0..R, 0..cols] = A[0..R, 0..k] · B[0..k, 0..cols] with `cols <= NR`; `c` has row
/// stride `ldc`. `padded`: B's rows hold `NR` values each, zero past `cols` (a [`Packed`] strip).
#[inline(always)]
unsafe fn tile<T: Elem, const R: usize, const NR: usize>(
    a: Rows,
    b: Rows<T>,
    k: usize,
    c: *mut f32,
    ldc: usize,
    (cols, padded): (usize, bool),
) {
    let mut acc = [[0f32; NR]; R];
    // A packed strip's last tile reads its zero padding as a full one does: its columns past
    // `cols` are never stored. Copying each row to a padded buffer, as a weight read in place
    // needs, is a `memcpy` call per row of the weight: reading the padding instead took `tiny`'s
    // gate and up products (688 columns, a last strip of 16) from 155 to 117 us at 64 rows, 44
    // to 34 at 16, 7.0 to 5.4 at one (Zen 4, medians of 3,000 calls, alternating builds). (A
    // store of constant length for full tiles was tried with it: 4-7% slower at 256 columns.)
    if cols == NR || padded {
        for p in 0..k {
            // One row (batch-1 decoding) waits on memory: prefetch a packed strip ahead (its rows
            // follow each other; a weight read in place is not prefetched).
            #[cfg(target_arch = "x86_64")]
            if R == 1 && b.rs == NR {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                // A hint only: an address past the strip's end is never read (nor faults).
                let ahead = b.ptr.wrapping_add(p * b.rs) as *const i8;
                for l in 0..(NR * std::mem::size_of::<T>()).div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(PREFETCH_AHEAD + l * 64));
                }
            }
            let brow = &*(b.ptr.add(p * b.rs) as *const [T; NR]);
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = *a.ptr.add(i * a.rs + p);
                for j in 0..NR {
                    acc[j] = av.mul_add(brow[j].f32(), acc[j]);
                }
            }
        }
    } else {
        // The last, partial tile of columns: the same sums over a zero-padded copy of each row.
        let mut brow = [T::default(); NR];
        for p in 0..k {
            std::ptr::copy_nonoverlapping(b.ptr.add(p * b.rs), brow.as_mut_ptr(), cols);
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = *a.ptr.add(i * a.rs + p);
                for j in 0..NR {
                    acc[j] = av.mul_add(brow[j].f32(), acc[j]);
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(acc.as_ptr(), c.add(i * ldc), cols);
    }
}

/// C's columns `[c0, c1)` (`c0` a multiple of `NR`) for every row, tile by tile. `strip` is 0
/// for a weight read in place; for a [`Packed`] one it is the length of a strip, where the
/// strip of columns `j..j + NR` starts.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn columns<T: Elem, const R: usize, const NR: usize>(
    m: usize,
    k: usize,
    a: Rows,
    b: Rows<T>,
    strip: usize,
    c: Out,
    ldc: usize,
    (c0, c1): (usize, usize),
) {
    // A packed weight's strips hold `NR` columns each, the last one zero-padded.
    let padded = strip != 0;
    let mut j = c0;
    while j < c1 {
        let width = (NR.min(c1 - j), padded);
        let bj = Rows {
            ptr: if strip == 0 {
                b.ptr.add(j)
            } else {
                b.ptr.add(j / NR * strip)
            },
            rs: b.rs,
        };
        let mut i = 0;
        while i < m {
            let ai = Rows {
                ptr: a.ptr.add(i * a.rs),
                rs: a.rs,
            };
            let ci = c.get().add(i * ldc + j);
            // The remainder rows get a tile of their own height (const generics need a match).
            match (m - i).min(R) {
                6.. => tile::<T, R, NR>(ai, bj, k, ci, ldc, width),
                5 => tile::<T, 5, NR>(ai, bj, k, ci, ldc, width),
                4 => tile::<T, 4, NR>(ai, bj, k, ci, ldc, width),
                3 => tile::<T, 3, NR>(ai, bj, k, ci, ldc, width),
                2 => tile::<T, 2, NR>(ai, bj, k, ci, ldc, width),
                _ => tile::<T, 1, NR>(ai, bj, k, ci, ldc, width),
            }
            i += R;
        }
        j += NR;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_v3<T: Elem>(
    m: usize,
    k: usize,
    a: Rows,
    b: Rows<T>,
    strip: usize,
    c: Out,
    ldc: usize,
    r: (usize, usize),
) {
    columns::<T, 6, 16>(m, k, a, b, strip, c, ldc, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns_v4<T: Elem>(
    m: usize,
    k: usize,
    a: Rows,
    b: Rows<T>,
    strip: usize,
    c: Out,
    ldc: usize,
    r: (usize, usize),
) {
    columns::<T, 6, 32>(m, k, a, b, strip, c, ldc, r)
}

/// The width of a tile of columns at this CPU's level (and of a [`Packed`] strip).
fn tile_width() -> usize {
    if simd::level() == Level::V4 {
        32
    } else {
        16
    }
}

/// A weight `(K, N)` laid out for [`matmul_packed`]: strips of [`tile_width`] columns, each
/// `K` rows of the strip's columns stored one after another (the last strip zero-padded), so
/// that a tile reads its part of the weight as one contiguous run. Read in place, a tile's rows
/// are a weight row apart, a new page each on the wider layers: on a model larger than L3 the
/// product then waits on memory (measured on a Zen 3: 25-50 GFLOP/s in place, 60-80 packed, for
/// 16 rows on `small`'s layer shapes with the weights coming from memory).
pub struct Packed {
    k: usize,
    n: usize,
    nr: usize,
    data: Weights,
}

/// A packed weight's elements: f32 ([`pack`]) or bf16 ([`pack_bf16`]).
enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Packed {
    /// Bytes the packed copy holds.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Weights::F32(d) => d.len() * 4,
            Weights::Bf16(d) => d.len() * 2,
        }
    }

    /// Whether the weight was packed as bf16 ([`pack_bf16`]).
    pub fn is_bf16(&self) -> bool {
        matches!(self.data, Weights::Bf16(_))
    }
}

/// `b (K, N)` (row stride `ldb`, columns contiguous) packed for [`matmul_packed`].
///
/// # Safety
/// `b` must point at a matrix of this shape and stride.
pub unsafe fn pack(k: usize, n: usize, b: *const f32, ldb: usize) -> Packed {
    Packed {
        k,
        n,
        nr: tile_width(),
        data: Weights::F32(pack_as(k, n, b, ldb, |x| x)),
    }
}

/// [`pack`] with every element rounded to bf16 (round to nearest even, as the `bf16` precision's
/// products round their inputs): half the bytes for [`matmul_packed`] to stream.
///
/// # Safety
/// As [`pack`].
pub unsafe fn pack_bf16(k: usize, n: usize, b: *const f32, ldb: usize) -> Packed {
    Packed {
        k,
        n,
        nr: tile_width(),
        data: Weights::Bf16(pack_as(k, n, b, ldb, super::bf16::to_bf16)),
    }
}

/// `b`'s strips of [`tile_width`] columns, each element converted by `f`, the padding zero.
unsafe fn pack_as<T: Elem>(
    k: usize,
    n: usize,
    b: *const f32,
    ldb: usize,
    f: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    let nr = tile_width();
    let mut data = vec![T::default(); n.div_ceil(nr) * k * nr];
    let b = Rows { ptr: b, rs: ldb };
    if k > 0 {
        data.par_chunks_mut(k * nr)
            .enumerate()
            .for_each(|(t, dst)| {
                let b: Rows = b; // the whole of it (a closure would capture the raw pointer alone)
                let (c0, cols) = (t * nr, nr.min(n - t * nr));
                for p in 0..k {
                    // SAFETY: row p, columns c0..c0 + cols of the matrix the caller vouched for.
                    let src = unsafe { std::slice::from_raw_parts(b.ptr.add(p * b.rs + c0), cols) };
                    for (d, &x) in dst[p * nr..p * nr + cols].iter_mut().zip(src) {
                        *d = f(x);
                    }
                }
            });
    }
    data
}

/// `a (M, K)` (row stride `lda`, columns contiguous) times `b (K, N)` (row stride `ldb`, columns
/// contiguous), into a fresh row-major `(M, N)`. Panics when [`available`] is false.
///
/// # Safety
/// `a` and `b` must point at matrices of these shapes and strides.
pub unsafe fn matmul(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
) -> Vec<f32> {
    run(
        m,
        k,
        n,
        Rows { ptr: a, rs: lda },
        Rows { ptr: b, rs: ldb },
        0,
    )
}

/// [`matmul`] with the weight [`pack`]ed: the same sums in the same order, so the same bits (for
/// a weight [`pack_bf16`]ed, the bits of [`matmul`] with the weight rounded to bf16).
/// Panics when [`available`] is false or the CPU's level changed since packing.
///
/// # Safety
/// `a` must point at a `(M, K)` matrix with row stride `lda`, `K` the packed weight's.
pub unsafe fn matmul_packed(m: usize, a: *const f32, lda: usize, b: &Packed) -> Vec<f32> {
    assert_eq!(b.nr, tile_width(), "packed for another tile width");
    let a = Rows { ptr: a, rs: lda };
    let strip = b.k * b.nr;
    match &b.data {
        Weights::F32(d) => run(m, b.k, b.n, a, Rows::new(d.as_ptr(), b.nr), strip),
        Weights::Bf16(d) => run(m, b.k, b.n, a, Rows::new(d.as_ptr(), b.nr), strip),
    }
}

/// The product on the calling thread and [`team`]'s helpers, column tiles split between them;
/// `strip` as in [`columns`].
unsafe fn run<T: Elem>(
    m: usize,
    k: usize,
    n: usize,
    a: Rows,
    b: Rows<T>,
    strip: usize,
) -> Vec<f32> {
    let level = simd::level();
    assert!(level != Level::Baseline, "skinny::matmul needs AVX2 + FMA");
    let nr = tile_width();
    // Not zeroed first: the tiles write every element (a zeroing pass was 2.8% of a rollout at
    // TRL's shapes, `memset` under this function).
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let c = Out(out.as_mut_ptr());
    let run = |range: (usize, usize)| {
        // SAFETY: the level was checked above; each task writes only its own columns of `out`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if level == Level::V4 {
                columns_v4(m, k, a, b, strip, c, n, range)
            } else {
                columns_v3(m, k, a, b, strip, c, n, range)
            }
        }
    };
    // Split the column tiles between the threads when there is enough work to pay for handing
    // it over (a few µs of arithmetic each). One row is bound by memory, not arithmetic, so it is
    // always split ([`takes`] sends it here only with a weight large enough).
    let work = if m == 1 {
        usize::MAX
    } else {
        (m * n * k / ONE_ROW_MIN_WEIGHT).max(1)
    };
    let tiles = n.div_ceil(nr);
    let threads = rayon::current_num_threads().min(tiles).min(work);
    if threads <= 1 {
        run((0, n));
    } else {
        // One piece a thread: cut finer, so that a helper arriving late still took a share,
        // `small` decoded slower (batch 1: 95-114 tok/s at 4 pieces a thread, 124-127 at 1).
        let per = tiles.div_ceil(threads) * nr;
        team::for_each(n.div_ceil(per), threads, &|t| {
            run((t * per, ((t + 1) * per).min(n)))
        });
    }
    // SAFETY: each of the column ranges above wrote its columns of every row (a tile stores all
    // its rows' columns, whatever k), so all m * n elements were written.
    unsafe { out.set_len(m * n) };
    out
}
