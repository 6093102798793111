//! Matrix products with bf16 inputs and f32 accumulation: the `bf16` matmul precision (the CPU
//! counterpart of PyTorch's `torch.autocast("cpu", torch.bfloat16)` for linear layers, or
//! `torch.set_float32_matmul_precision("medium")`).
//!
//! Operands stay f32 in memory. Each product rounds them to bf16 (round to nearest even) while
//! packing them into panels, multiplies pairs of bf16 values exactly and sums in f32. On a CPU with
//! AVX512-BF16 one `vdpbf16ps` does 32 multiply-adds where an f32 FMA does 16 (measured on one
//! core: 224 GFLOP/s for the micro-kernel below, 113 for the same tile with f32 FMAs). Written by
//! hand because no crate of the field has a bf16 dot-product kernel for x86 (the `gemm` crate's
//! f16 path converts to f32 and multiplies at f32 speed).
//!
//! The layout follows the BLIS design (Van Zee & van de Geijn 2015): B is packed a block of `KC`
//! rows at a time into panels of `NR` columns, A a block of `MC` rows into panels of `MR` rows
//! (or, when A's columns are contiguous, as in a weight's gradient `xᵀ dy`, all of A at once),
//! and a register-blocked micro-kernel computes an `MR x NR` tile of C from one panel of each.
//! bf16 values are paired along k (`vdpbf16ps` sums two products per f32 lane), so a packed panel
//! holds, for each pair of k, the pairs of its rows or columns side by side.
//!
//! On an Intel Xeon with AMX (Sapphire Rapids on), where `vdpbf16ps` runs at a quarter of the
//! f32 FMA's rate, the micro-kernel is [`kernel_amx`] instead: the same panels, read as 16 x 16
//! tiles by the tile unit (measured: 1.0 TFLOP/s on 2 cores for the forward products, against 150
//! GFLOP/s for `vdpbf16ps` and 290 for f32 `gemm`). [`amx`] says whether it runs; `KILN_AMX=0`
//! turns it off for a process.
//!
//! Without AVX512-BF16 a portable micro-kernel computes the same products, much more slowly;
//! [`native`] says which one runs, and the matmul wrapper falls back to f32 `gemm` there.

use rayon::prelude::*;

/// Rows of a C tile.
pub const MR: usize = 12;
/// Columns of a C tile (two 16-lane registers).
pub const NR: usize = 32;
/// k values per packed block (an even number).
const KC: usize = 256;
/// Rows of A per task, about ([`super::row_blocks`]).
const MC: usize = 120;
/// Pairs of k in one AMX tile row (64 bytes): packed panels hold a multiple of this many pairs,
/// the padding zero, so that the tile kernel always reads whole tiles.
const KT: usize = 16;

/// Pairs a packed panel holds for `kc` values of k: `kc / 2` rounded up, then up to [`KT`].
fn padded_pairs(kc: usize) -> usize {
    kc.div_ceil(2).next_multiple_of(KT)
}

/// `x` rounded to bf16 (round to nearest even; NaN stays NaN): the rounding the packing does.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    (rne_hi(x) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16 and back.
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Whether this CPU runs the AVX512-BF16 micro-kernel.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *NATIVE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU and OS run the AMX tile micro-kernel ([`kernel_amx`]): AMX-BF16 and
/// AMX-TILE (Intel Xeon from Sapphire Rapids on), AVX512-BF16 for the packing, and Linux's
/// permission for the tile data, which a process must ask for once (`arch_prctl`).
pub fn amx() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMX.get_or_init(|| {
            if !native() || std::env::var_os("KILN_AMX").is_some_and(|v| v == "0") {
                return false;
            }
            // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 when granted.
            let granted = || {
                let ret: i64;
                // SAFETY: a plain Linux system call with no memory operands.
                unsafe {
                    std::arch::asm!(
                        "syscall",
                        inlateout("rax") 158i64 => ret,
                        in("rdi") 0x1023i64,
                        in("rsi") 18i64,
                        lateout("rcx") _,
                        lateout("r11") _,
                        options(nostack),
                    )
                };
                ret == 0
            };
            cpu_has_amx() && granted()
        })
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// Whether the CPU has AMX-BF16 and AMX-TILE, whatever the OS allows or `KILN_AMX` says.
fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !native() {
            return false;
        }
        // cpuid leaf 7 (structured extended features) exists on every CPU with AVX-512.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        edx >> 22 & 1 == 1 && edx >> 24 & 1 == 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether bf16 products beat f32 ones in training on this CPU: it has AVX512-BF16, and either
/// AMX tiles or a core whose `vdpbf16ps` keeps up with its f32 FMAs (AMD Zen 4 and 5: 1.7-2.0x
/// f32 there). An Intel core of the Sapphire Rapids generation on (AVX512-FP16) runs
/// `vdpbf16ps` at a quarter of the FMA's rate, and without its tiles (a VM that does not expose
/// them) bf16 loses: on such a 2-core Xeon VM, `tiny` trained at 3,188-3,462 tokens/s at bf16
/// against 4,473-5,220 at f32 (alternating). Decoding reads bf16 weights wherever [`native`]:
/// it waits on memory, not on the multiply-adds.
pub fn pays() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        native() && (cpu_has_amx() || !std::arch::is_x86_feature_detected!("avx512fp16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which micro-kernel a product runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The best this CPU has: [`Kernel::Amx`] where [`amx`], else [`Kernel::Avx512`] where
    /// [`native`], else [`Kernel::Portable`].
    Best,
    /// AMX tiles, every operand layout in the row layout ([`pack_a_t`] packs a weight
    /// gradient's `xᵀ` for it). Needs [`amx`].
    Amx,
    /// `vdpbf16ps`. Needs [`native`].
    Avx512,
    /// Portable code: the same products of bf16 pairs, summed in f32.
    Portable,
}

impl Kernel {
    /// `Best` resolved for this CPU; panics when the CPU lacks what the kernel needs.
    fn resolve(self) -> Kernel {
        match self {
            Kernel::Best if amx() => Kernel::Amx,
            Kernel::Best if native() => Kernel::Avx512,
            Kernel::Best => Kernel::Portable,
            Kernel::Amx => {
                assert!(
                    amx(),
                    "the AMX kernel needs AMX-BF16 and the OS's permission"
                );
                Kernel::Amx
            }
            Kernel::Avx512 => {
                assert!(native(), "the AVX512-BF16 kernel needs AVX512-BF16");
                Kernel::Avx512
            }
            Kernel::Portable => Kernel::Portable,
        }
    }

    /// The kernels this CPU can run, best first (what the tests compare).
    pub fn available() -> Vec<Kernel> {
        let mut v = vec![];
        if amx() {
            v.push(Kernel::Amx);
        }
        if native() {
            v.push(Kernel::Avx512);
        }
        v.push(Kernel::Portable);
        v
    }
}

/// A read-only f32 matrix given by pointer and strides (in elements).
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// The transpose: the same memory with the strides swapped.
    pub fn t(self) -> Mat {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Column `c`'s first `len` elements, when columns are contiguous (`rs == 1`).
    unsafe fn col<'a>(self, c: usize, len: usize) -> &'a [f32] {
        std::slice::from_raw_parts(self.ptr.offset(c as isize * self.cs), len)
    }

    #[inline(always)]
    unsafe fn at(&self, r: usize, c: usize) -> f32 {
        *self.ptr.offset(r as isize * self.rs + c as isize * self.cs)
    }
}

/// C's pointer, shared by the tasks; each writes its own rows and columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `OutPtr`, not its raw field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// bf16 bits of `x` (round to nearest even; NaN stays NaN) in the high half of a u32. Branch-free,
/// so the packing loops below vectorize.
#[inline(always)]
fn rne_hi(x: f32) -> u32 {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        (b | 0x0040_0000) & 0xffff_0000
    } else {
        r
    }
}

/// The bf16 pair `(lo, hi)` as one u32, `lo` in the low half (the order `vdpbf16ps` reads).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    rne_hi(hi) | (rne_hi(lo) >> 16)
}

/// `out[i] = pair(x0[i], x1[i])`: two rows (or columns) of f32 combined lane by lane.
fn pairs_lanes(x0: &[f32], x1: &[f32], out: &mut [u32]) {
    let n = out.len().min(x0.len()).min(x1.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if native() {
        // SAFETY: the CPU has AVX512-BF16; every access is below `n`.
        unsafe { done = pairs_lanes_native(x0.as_ptr(), x1.as_ptr(), out.as_mut_ptr(), n) };
    }
    for i in done..n {
        out[i] = pair(x0[i], x1[i]);
    }
}

/// The 16 values of `x0` and of `x1` as 16 bf16 pairs `(x0[i], x1[i])`, rounded to nearest even
/// ([`pair`] lane by lane): one conversion of both, then the low half's 16 bf16 interleaved
/// with the high half's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn pairs16(
    x0: std::arch::x86_64::__m512,
    x1: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let v = _mm512_cvtne2ps_pbh(x1, x0);
    _mm512_permutexvar_epi16(idx, std::mem::transmute::<__m512bh, __m512i>(v))
}

/// A 16-lane mask of the first `n` lanes (all 16 from `n` = 16 on).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn mask16(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// [`pairs_lanes`] 16 lanes at a time; returns how many it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs_lanes_native(x0: *const f32, x1: *const f32, out: *mut u32, n: usize) -> usize {
    debug_assert!(n < 1 << 31);
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 16 <= n {
        let v = pairs16(_mm512_loadu_ps(x0.add(i)), _mm512_loadu_ps(x1.add(i)));
        _mm512_storeu_si512(out.add(i) as *mut _, v);
        i += 16;
    }
    if i < n {
        // The tail (an A panel's 12 rows) under a mask.
        let k = mask16(n - i);
        let v = pairs16(
            _mm512_maskz_loadu_ps(k, x0.add(i)),
            _mm512_maskz_loadu_ps(k, x1.add(i)),
        );
        _mm512_mask_storeu_epi32(out.add(i) as *mut _, k, v);
    }
    n
}

/// `out[i] = pair(x[2i], x[2i + 1])` (0 past the end of `x`): consecutive f32 as bf16 pairs.
fn pairs_seq(x: &[f32], out: &mut [u32]) {
    let n = out.len().min(x.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if native() {
        // SAFETY: the CPU has AVX512-BF16; every access is below `2n` floats and `n` pairs.
        unsafe { done = pairs_seq_native(x.as_ptr(), out.as_mut_ptr(), n) };
    }
    for i in done..n {
        out[i] = pair(x[2 * i], x[2 * i + 1]);
    }
    if let Some(o) = out.get_mut(n) {
        *o = if x.len() % 2 == 1 {
            pair(x[x.len() - 1], 0.0)
        } else {
            0
        };
    }
}

/// [`pairs_seq`] 16 pairs at a time; returns how many it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs_seq_native(x: *const f32, out: *mut u32, n: usize) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_cvtne2ps_pbh(
            _mm512_loadu_ps(x.add(2 * i + 16)),
            _mm512_loadu_ps(x.add(2 * i)),
        );
        _mm512_storeu_si512(
            out.add(i) as *mut _,
            std::mem::transmute::<__m512bh, __m512i>(v),
        );
        i += 16;
    }
    i
}

/// Packs panel `j` of rows `k0..k0 + kc` of the `k x n` matrix `b` into `dst`, [`padded_pairs`]
/// `(kc)` pairs: pair `p` holds `NR` pairs `(b[k0 + 2p][c], b[k0 + 2p + 1][c])` for the panel's
/// columns `c`; columns past `n`, the odd row past `kc` and the padding pairs are 0.
unsafe fn pack_b_panel(b: Mat, k0: usize, kc: usize, n: usize, j: usize, dst: &mut [u32]) {
    let kcp = kc.div_ceil(2);
    let cols = NR.min(n - j * NR);
    let c0 = j * NR;
    #[cfg(target_arch = "x86_64")]
    if native() && (b.cs == 1 || b.rs == 1) {
        // SAFETY: the CPU has AVX512-BF16; the panel's rows and columns lie in `b`.
        unsafe {
            if b.cs == 1 {
                pack_b_rows_native(b, k0, kc, c0, cols, dst);
            } else {
                pack_b_cols_native(b, k0, kc, c0, cols, dst);
            }
        }
        return;
    }
    if b.cs == 1 {
        // Rows contiguous: two rows' columns combine lane by lane.
        for p in 0..kcp {
            let row = &mut dst[p * NR..(p + 1) * NR];
            let r0 = std::slice::from_raw_parts(
                b.ptr.offset((k0 + 2 * p) as isize * b.rs + c0 as isize),
                cols,
            );
            if 2 * p + 1 < kc {
                let r1 = std::slice::from_raw_parts(r0.as_ptr().offset(b.rs), cols);
                pairs_lanes(r0, r1, &mut row[..cols]);
            } else {
                for (d, &x0) in row.iter_mut().zip(r0) {
                    *d = pair(x0, 0.0);
                }
            }
            row[cols..].fill(0);
        }
        dst[kcp * NR..].fill(0);
    } else if b.rs == 1 {
        // Columns contiguous (a transposed weight): each column's pairs are consecutive.
        let mut col = vec![0u32; kcp];
        dst.fill(0);
        for c in 0..cols {
            let x = std::slice::from_raw_parts(
                b.ptr.offset(k0 as isize + (c0 + c) as isize * b.cs),
                kc,
            );
            pairs_seq(x, &mut col);
            for (p, &v) in col.iter().enumerate() {
                dst[p * NR + c] = v;
            }
        }
    } else {
        pack_b_panel_strided(b, k0, kc, c0, cols, dst);
    }
}

/// [`pack_b_panel`] for any strides, one value at a time: `cols` columns from `c0`. (What the
/// native packers are checked against.)
unsafe fn pack_b_panel_strided(
    b: Mat,
    k0: usize,
    kc: usize,
    c0: usize,
    cols: usize,
    dst: &mut [u32],
) {
    let kcp = kc.div_ceil(2);
    for p in 0..kcp {
        let row = &mut dst[p * NR..(p + 1) * NR];
        let (r0, r1) = (k0 + 2 * p, k0 + 2 * p + 1);
        let has1 = 2 * p + 1 < kc;
        for (c, d) in row.iter_mut().enumerate().take(cols) {
            let hi = if has1 { b.at(r1, c0 + c) } else { 0.0 };
            *d = pair(b.at(r0, c0 + c), hi);
        }
        row[cols..].fill(0);
    }
    dst[kcp * NR..].fill(0);
}

/// One panel of [`pack_b_panel`] from `b` with contiguous rows (`dy` in a weight's gradient
/// `xᵀ dy`, a weight in `x W`): for each pair of rows, the panel's 32 columns of both in two
/// `vcvtne2ps2bf16` and two lane interleaves, the whole panel in one loop. Calling
/// [`pairs_lanes`] once per pair of rows, 32 values at a time, spent a quarter of the packing's
/// time around the conversion (the weight gradients' packing: 7.3% of their profile before, 5.3%
/// after, `examples/bf16_shapes.rs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_rows_native(
    b: Mat,
    k0: usize,
    kc: usize,
    c0: usize,
    cols: usize,
    dst: &mut [u32],
) {
    use std::arch::x86_64::*;
    let kcp = kc.div_ceil(2);
    debug_assert!(dst.len() >= padded_pairs(kc) * NR && cols <= NR && NR == 32);
    let (m0, m1) = (mask16(cols), mask16(cols.saturating_sub(16)));
    let out = dst.as_mut_ptr();
    for p in 0..kcp {
        let r0 = b.ptr.offset((k0 + 2 * p) as isize * b.rs + c0 as isize);
        // The odd row past `kc` pairs with zeros. (Lanes under a zero mask are not read, so the
        // pointers to them may lie past B: wrapping arithmetic.)
        let (n0, n1) = if 2 * p + 1 < kc { (m0, m1) } else { (0, 0) };
        let r1 = r0.wrapping_offset(b.rs);
        for (g, (m, n)) in [(m0, n0), (m1, n1)].into_iter().enumerate() {
            let v = pairs16(
                _mm512_maskz_loadu_ps(m, r0.wrapping_add(16 * g)),
                _mm512_maskz_loadu_ps(n, r1.wrapping_add(16 * g)),
            );
            _mm512_storeu_si512(out.add(p * NR + 16 * g) as *mut _, v);
        }
    }
    dst[kcp * NR..].fill(0);
}

/// One panel of [`pack_b_panel`] from `b` with contiguous columns (`b.rs == 1`: `Wᵀ` in an input's
/// gradient `dy Wᵀ`), 16 columns and 16 pairs at a time: each column's 32 consecutive values
/// become 16 pairs in one `vcvtne2ps2bf16`, and [`transpose16`] turns 16 such columns into 16 rows
/// of pairs, each one 64-byte store. Replaces a scalar store per pair (measured: up to 2.7% of a
/// PPO iteration at bf16 went to packing weights this way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_b_cols_native(
    b: Mat,
    k0: usize,
    kc: usize,
    c0: usize,
    cols: usize,
    dst: &mut [u32],
) {
    use std::arch::x86_64::*;
    let padded = padded_pairs(kc);
    debug_assert!(dst.len() >= padded * NR && cols <= NR);
    // Values of k that lie at or past `from` within the block: a 16-lane mask.
    let lanes = |from: usize| mask16(kc.saturating_sub(from));
    let mut v = [_mm512_setzero_si512(); 16];
    for g in 0..NR / 16 {
        for p0 in (0..padded).step_by(16) {
            let (m0, m1) = (lanes(2 * p0), lanes(2 * p0 + 16));
            for (cc, v) in v.iter_mut().enumerate() {
                let c = 16 * g + cc;
                *v = if c < cols && m0 != 0 {
                    let x = b
                        .ptr
                        .offset(k0 as isize + 2 * p0 as isize + (c0 + c) as isize * b.cs);
                    let lo = _mm512_maskz_loadu_ps(m0, x);
                    let hi = _mm512_maskz_loadu_ps(m1, x.add(16));
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
                } else {
                    _mm512_setzero_si512()
                };
            }
            // v[cc] holds pairs p0.. of column 16 g + cc; after this v[q] holds pair p0 + q of
            // the 16 columns.
            transpose16(&mut v);
            for (q, v) in v.iter().enumerate() {
                _mm512_storeu_si512(dst.as_mut_ptr().add((p0 + q) * NR + 16 * g) as *mut _, *v);
            }
        }
    }
}

/// Pairs of k per row of an A panel in the row layout.
const KP: usize = KC / 2;

/// Where pair `p` of row `r` sits in an A panel. `ROWS` (A's rows contiguous): each panel row
/// holds its `KP` pairs, `r * KP + p`, filled by converting the row in one pass. Otherwise (A's
/// columns contiguous, as `xᵀ` in a weight's gradient): A is packed whole, each pair of k holding
/// the pairs of all `lda` rows, `p * lda + r`, filled lane by lane from two columns.
#[inline(always)]
fn a_index<const ROWS: bool>(r: usize, p: usize, lda: usize) -> usize {
    if ROWS {
        r * KP + p
    } else {
        p * lda + r
    }
}

/// Packs rows `m0..m0 + mc`, columns `k0..k0 + kc` of `a` into `ceil(mc / MR)` panels of
/// `MR * KP` pairs in the row layout. Missing rows, the odd column past `kc` and the padding
/// pairs up to [`padded_pairs`]`(kc)` are 0.
unsafe fn pack_a_rows(a: Mat, m0: usize, mc: usize, k0: usize, kc: usize, out: &mut [u32]) {
    let (kcp, padded) = (kc.div_ceil(2), padded_pairs(kc));
    for (i, dst) in out[..mc.div_ceil(MR) * MR * KP]
        .chunks_mut(MR * KP)
        .enumerate()
    {
        let rows = MR.min(mc - i * MR);
        let r0 = m0 + i * MR;
        for r in 0..MR {
            let d = &mut dst[r * KP..r * KP + kcp];
            if r >= rows {
                d.fill(0);
            } else if a.cs == 1 {
                let x = std::slice::from_raw_parts(
                    a.ptr.offset((r0 + r) as isize * a.rs + k0 as isize),
                    kc,
                );
                pairs_seq(x, d);
            } else {
                for (p, d) in d.iter_mut().enumerate() {
                    let c = k0 + 2 * p;
                    let hi = if 2 * p + 1 < kc {
                        a.at(r0 + r, c + 1)
                    } else {
                        0.0
                    };
                    *d = pair(a.at(r0 + r, c), hi);
                }
            }
            dst[r * KP + kcp..r * KP + padded].fill(0);
        }
    }
}

/// Packs all of `a (m x k)`, whose columns are contiguous (`a.rs == 1`: `xᵀ` in a weight's
/// gradient), in the row layout the AMX kernel reads: block `kb` of `KC` columns, panel `i` of
/// `MR` rows at `(kb * panels + i) * MR * KP`, each laid out as [`pack_a_rows`] lays one (row `r`,
/// pair `p` at `r * KP + p`; rows past `m`, the odd column past `k` and the padding pairs up to
/// [`padded_pairs`] are 0). `panels` is `m` in panels of `MR`.
///
/// A row of the panel is a column of `a`'s memory, so the values must be transposed. Two
/// contiguous columns pair lane by lane into 16 rows' pairs (one `vcvtne2ps2bf16` and one
/// permute), and 16 such vectors, 16 pairs of k, are transposed in registers as a 16 x 16 block
/// of 32-bit pairs; each of its rows is then one 64-byte store. Packing the same values one pair
/// at a time, 12 rows each (the AMX path's `pack_a_rows` did that in every task) was 15% of a bf16
/// training step (measured); this takes under 2%.
#[cfg(target_arch = "x86_64")]
unsafe fn pack_a_t(a: Mat, m: usize, k: usize, out: &mut [u32]) {
    debug_assert!(a.rs == 1 && amx());
    let panels = m.div_ceil(MR);
    let kblocks = k.div_ceil(KC);
    let groups = (panels * MR).div_ceil(16);
    let out = OutPtr(out[..kblocks * panels * MR * KP].as_mut_ptr() as *mut f32);
    let task = |t: usize| {
        let (kb, g) = (t / groups, t % groups);
        // SAFETY: task (kb, g) writes rows 16g.. of block kb's panels and nothing else; the
        // reads stay inside a's m x k.
        unsafe { pack_a_t_group(a, m, k, kb, g, panels, out.get() as *mut u32) };
    };
    let tasks = kblocks * groups;
    if m * k >= 1 << 16 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Rows `16 g..16 g + 16` of block `kb` for [`pack_a_t`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_t_group(
    a: Mat,
    m: usize,
    k: usize,
    kb: usize,
    g: usize,
    panels: usize,
    out: *mut u32,
) {
    use std::arch::x86_64::*;
    let r0 = 16 * g;
    // Rows of `a` to read (possibly none) and rows of the panels to write.
    let rows = m.saturating_sub(r0).min(16);
    let write = (panels * MR - r0).min(16);
    let mask = mask16(rows);
    let (k0, kc) = (kb * KC, KC.min(k - kb * KC));
    let kcp = kc.div_ceil(2);
    let col = |c: usize| a.ptr.offset(c as isize * a.cs + r0 as isize);
    let mut v = [_mm512_setzero_si512(); 16];
    for pc in 0..padded_pairs(kc) / 16 {
        for (q, v) in v.iter_mut().enumerate() {
            let p = 16 * pc + q;
            *v = if p >= kcp {
                _mm512_setzero_si512()
            } else {
                let c = k0 + 2 * p;
                let x0 = _mm512_maskz_loadu_ps(mask, col(c));
                let x1 = if 2 * p + 1 < kc {
                    _mm512_maskz_loadu_ps(mask, col(c + 1))
                } else {
                    _mm512_setzero_ps()
                };
                pairs16(x0, x1)
            };
        }
        // v[q] holds pair 16 pc + q of the 16 rows; after this v[r] holds row r's 16 pairs.
        transpose16(&mut v);
        for (r, v) in v.iter().enumerate().take(write) {
            let row = r0 + r;
            let at = (kb * panels + row / MR) * MR * KP + (row % MR) * KP + 16 * pc;
            _mm512_storeu_si512(out.add(at) as *mut _, *v);
        }
    }
}

/// Transposes a 16 x 16 block of 32-bit values held one row per register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn transpose16(r: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    // Within each 128-bit lane: 2 x 2 blocks of 32 bits, then 4 x 4.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        u[4 * i] = _mm512_unpacklo_epi64(a, c);
        u[4 * i + 1] = _mm512_unpackhi_epi64(a, c);
        u[4 * i + 2] = _mm512_unpacklo_epi64(b, d);
        u[4 * i + 3] = _mm512_unpackhi_epi64(b, d);
    }
    // u[4 i + j], lane l (of four 128-bit lanes): rows 4i..4i+4 of column 4 l + j.
    // Then 128-bit lanes across registers: rows 0-7 and 8-15 first, then all 16.
    let mut w = [_mm512_setzero_si512(); 16];
    for h in 0..2 {
        for j in 0..4 {
            let (a, b) = (u[8 * h + j], u[8 * h + 4 + j]);
            // lanes 0, 2 of a then of b: columns j and 8 + j of rows 8h..8h+8.
            w[8 * h + j] = _mm512_shuffle_i32x4::<0x88>(a, b);
            // lanes 1, 3: columns 4 + j and 12 + j.
            w[8 * h + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(a, b);
        }
    }
    // w[8h + j] lanes: (rows 8h..8h+4, col j), (8h..8h+4, col 8+j), (8h+4.., col j), (8h+4.., col 8+j)
    // w[8h + 4 + j]: the same for columns 4 + j and 12 + j.
    for j in 0..8 {
        let (a, b) = (w[j], w[8 + j]);
        // column c = j (j < 4) or 4 + (j - 4) = j: lanes 0, 2 of a then of b.
        let lo = _mm512_shuffle_i32x4::<0x88>(a, b);
        // column 8 + j: lanes 1, 3.
        let hi = _mm512_shuffle_i32x4::<0xdd>(a, b);
        r[j] = lo;
        r[8 + j] = hi;
    }
}

/// Packs all of `a (m x k)`, whose columns are contiguous (`a.rs == 1`), in the column layout:
/// block `kb` of `KC` columns, pair `p`, row `r` at `(kb * KP + p) * lda + r`, `lda` = `m`
/// rounded up to `MR`. Rows past `m` and the odd column at the end are 0.
unsafe fn pack_a_cols(a: Mat, m: usize, k: usize, lda: usize, out: &mut [u32]) {
    let kblocks = k.div_ceil(KC);
    let pack = |(q, d): (usize, &mut [u32])| {
        let (kb, p) = (q / KP, q % KP);
        let c = kb * KC + 2 * p;
        if c >= k.min((kb + 1) * KC) {
            return; // past this block's pairs: never read
        }
        let col = |c: usize| a.col(c, m);
        if c + 1 < k.min((kb + 1) * KC) {
            pairs_lanes(col(c), col(c + 1), &mut d[..m]);
        } else {
            for (d, &x) in d.iter_mut().zip(col(c)) {
                *d = pair(x, 0.0);
            }
        }
        d[m..].fill(0);
    };
    let out = &mut out[..kblocks * KP * lda];
    if m * k >= 1 << 16 {
        out.par_chunks_mut(lda).enumerate().for_each(pack);
    } else {
        out.chunks_mut(lda).enumerate().for_each(pack);
    }
}

/// The `MR x NR` tile `a_panel · b_panel` over `kcp` pairs of k, with AVX512-BF16, written to
/// (or with `add`, added to) C's first `rows` rows and `cols` columns at `c`, row stride `c_rs`,
/// straight from the registers under masks. Going through a tile buffer and a scalar copy or
/// add instead was 7% of a bf16 training step (measured on a Zen 4: the copy loop and its
/// `memmove`). Only the tile's first `R` rows (a multiple of 4 that covers `rows`) and `Z`
/// 16-lane groups (those that hold `cols`) are multiplied: a last panel of rows or columns
/// computes no more than it stores, within 3 rows (`tiny`'s 256 rows end in a panel of 4, its
/// 688 columns in a panel of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_native<const ROWS: bool>(
    kcp: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    c_rs: isize,
    (rows, cols): (usize, usize),
    add: bool,
) {
    let args = (kcp, a, lda, b, c, c_rs, (rows, cols), add);
    match (rows.div_ceil(4), cols > 16) {
        (3, true) => kernel_rz::<ROWS, MR, 2>(args),
        (3, false) => kernel_rz::<ROWS, MR, 1>(args),
        (2, true) => kernel_rz::<ROWS, 8, 2>(args),
        (2, false) => kernel_rz::<ROWS, 8, 1>(args),
        (_, true) => kernel_rz::<ROWS, 4, 2>(args),
        (_, false) => kernel_rz::<ROWS, 4, 1>(args),
    }
}

/// [`kernel_native`] on the first `R` rows and `Z` groups of 16 columns of the tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
#[allow(clippy::type_complexity)]
unsafe fn kernel_rz<const ROWS: bool, const R: usize, const Z: usize>(
    (kcp, a, lda, b, c, c_rs, (rows, cols), add): (
        usize,
        *const u32,
        usize,
        *const u32,
        *mut f32,
        isize,
        (usize, usize),
        bool,
    ),
) {
    use std::arch::x86_64::*;
    debug_assert!(rows <= R && R <= MR && cols <= 16 * Z && Z <= NR / 16);
    let mut acc = [[_mm512_setzero_ps(); Z]; R];
    for p in 0..kcp {
        let bp = b.add(p * NR);
        let bv: [__m512bh; Z] = std::array::from_fn(|z| {
            std::mem::transmute(_mm512_loadu_si512(bp.add(16 * z) as *const _))
        });
        for (r, ar) in acc.iter_mut().enumerate() {
            let x = *a.add(a_index::<ROWS>(r, p, lda)) as i32;
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(x));
            for (acc, &bz) in ar.iter_mut().zip(&bv) {
                *acc = _mm512_dpbf16_ps(*acc, av, bz);
            }
        }
    }
    // The same stores as `sgemm`'s kernel, written out in each: through one shared function
    // (`#[inline]`, AVX-512F) the bf16 products ran 5-9% slower on one thread, every shape of
    // `bf16_shapes` (four runs in alternating order, Zen 4), the f32 ones unchanged.
    let masks: [__mmask16; Z] = std::array::from_fn(|z| mask16(cols.saturating_sub(16 * z)));
    for (r, ar) in acc.iter().enumerate().take(rows) {
        let cr = c.offset(r as isize * c_rs);
        for (z, (&v, &mask)) in ar.iter().zip(&masks).enumerate() {
            // Masked lanes are neither read nor written, so they may point past C's row.
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

/// The tile registers as [`kernel_amx`] uses them (`ldtilecfg`'s 64-byte layout, palette 1):
/// C in tmm0 and tmm1 (`MR` rows of 16 f32), A in tmm2 (`MR` rows of [`KT`] pairs), B in tmm3 and
/// tmm4 ([`KT`] pairs of 16 columns); [`kernel_amx2`]'s second panel of A in tmm7 and its C in
/// tmm5 and tmm6.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads [`TileConfig`] into this thread's tile registers, for [`kernel_amx`] until
/// [`amx_release`].
#[cfg(target_arch = "x86_64")]
unsafe fn amx_configure() {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    cfg.colsb[..8].fill(64);
    let (m, k) = (MR as u8, KT as u8);
    cfg.rows[..8].copy_from_slice(&[m, m, m, k, k, m, m, m]);
    std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
}

/// Returns this thread's tile registers to their initial state.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_release() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// [`kernel_native`] on the AMX tile unit, for the row layout: each `tdpbf16ps` does
/// `MR x 16 x 32` multiply-adds, the work of 384 f32 FMA instructions (on a Xeon with AMX,
/// `vdpbf16ps` runs at a quarter of the FMA's instruction rate, measured). `kcp` is rounded
/// up to whole tiles of [`KT`] pairs, whose padding [`pack_b_panel`] and [`pack_a_rows`] zero. The
/// thread's tiles must be configured ([`amx_configure`]). Written in assembly because Rust's AMX
/// intrinsics are not stable.
///
/// C goes straight to and from memory: `c` is the tile's first element, `c_rs` its row stride
/// (in elements), and with `add` the tile is loaded from there and added to. Going through the
/// `tile` buffer of the other kernels instead cost more than the products where C is updated
/// once per block of k (measured: 490-550 GFLOP/s at K = 688, against 1,000 at K = 256).
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_amx(
    kcp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: isize,
    add: bool,
) {
    use std::arch::asm;
    let sc = c_rs * 4;
    if add {
        asm!(
            "tileloadd tmm0, [{c} + {sc}*1]",
            "tileloadd tmm1, [{c1} + {sc}*1]",
            c = in(reg) c,
            c1 = in(reg) c.add(16),
            sc = in(reg) sc,
            options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
    }
    let (sa, sb) = (KP * 4, NR * 4);
    for g in 0..kcp.div_ceil(KT) {
        let (ap, bp) = (a.add(g * KT), b.add(g * KT * NR));
        asm!(
            "tileloadd tmm2, [{a} + {sa}*1]",
            "tileloadd tmm3, [{b} + {sb}*1]",
            "tileloadd tmm4, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm2, tmm3",
            "tdpbf16ps tmm1, tmm2, tmm4",
            a = in(reg) ap,
            b = in(reg) bp,
            b1 = in(reg) bp.add(16),
            sa = in(reg) sa,
            sb = in(reg) sb,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c} + {sc}*1], tmm0",
        "tilestored [{c1} + {sc}*1], tmm1",
        c = in(reg) c,
        c1 = in(reg) c.add(16),
        sc = in(reg) sc,
        options(nostack),
    );
}

/// [`kernel_amx`] for two panels of A at once, `a` and the next one (`MR * KP` pairs on), into
/// C's rows `0..MR` (tmm0, tmm1) and `MR..2 MR` (tmm5, tmm6): each pair of B tiles loaded serves
/// four `tdpbf16ps` instead of two (loads per product: 14 rows instead of 20).
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_amx2(
    kcp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: isize,
    add: bool,
) {
    use std::arch::asm;
    let sc = c_rs * 4;
    let c2 = c.offset(MR as isize * c_rs);
    if add {
        asm!(
            "tileloadd tmm0, [{c} + {sc}*1]",
            "tileloadd tmm1, [{c1} + {sc}*1]",
            "tileloadd tmm5, [{c2} + {sc}*1]",
            "tileloadd tmm6, [{c3} + {sc}*1]",
            c = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c2,
            c3 = in(reg) c2.add(16),
            sc = in(reg) sc,
            options(nostack, readonly),
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm5",
            "tilezero tmm6",
            options(nostack, nomem)
        );
    }
    let (sa, sb) = (KP * 4, NR * 4);
    for g in 0..kcp.div_ceil(KT) {
        let (ap, bp) = (a.add(g * KT), b.add(g * KT * NR));
        asm!(
            "tileloadd tmm2, [{a} + {sa}*1]",
            "tileloadd tmm3, [{b} + {sb}*1]",
            "tdpbf16ps tmm0, tmm2, tmm3",
            "tileloadd tmm4, [{b1} + {sb}*1]",
            "tdpbf16ps tmm1, tmm2, tmm4",
            "tileloadd tmm7, [{a1} + {sa}*1]",
            "tdpbf16ps tmm5, tmm7, tmm3",
            "tdpbf16ps tmm6, tmm7, tmm4",
            a = in(reg) ap,
            a1 = in(reg) ap.add(MR * KP),
            b = in(reg) bp,
            b1 = in(reg) bp.add(16),
            sa = in(reg) sa,
            sb = in(reg) sb,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c} + {sc}*1], tmm0",
        "tilestored [{c1} + {sc}*1], tmm1",
        "tilestored [{c2} + {sc}*1], tmm5",
        "tilestored [{c3} + {sc}*1], tmm6",
        c = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c2,
        c3 = in(reg) c2.add(16),
        sc = in(reg) sc,
        options(nostack),
    );
}

/// [`kernel_native`] in portable code: the same products of bf16 pairs, summed in f32.
unsafe fn kernel_portable<const ROWS: bool>(
    kcp: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    tile: &mut [f32; MR * NR],
) {
    let lo = |x: u32| f32::from_bits(x << 16);
    let hi = |x: u32| f32::from_bits(x & 0xffff_0000);
    tile.fill(0.0);
    for p in 0..kcp {
        let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
        for r in 0..MR {
            let ar = *a.add(a_index::<ROWS>(r, p, lda));
            let (a0, a1) = (lo(ar), hi(ar));
            let row = &mut tile[r * NR..(r + 1) * NR];
            for (x, &bc) in row.iter_mut().zip(bp) {
                *x += a1 * hi(bc);
                *x += a0 * lo(bc);
            }
        }
    }
}

thread_local! {
    /// Packing buffers kept between products (one per thread and role), so that a training
    /// step does not allocate and zero them again for each of its products.
    static SCRATCH: [std::cell::Cell<Vec<u32>>; 3] = Default::default();
}

/// Runs `f` with this thread's scratch buffer `slot`, at least `len` long. Its contents are
/// stale: callers write every element they read. (A nested call on the same thread finds the
/// slot empty and allocates.)
fn with_scratch<R>(slot: usize, len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s[slot].take());
    if buf.len() < len {
        buf = vec![0; len];
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| s[slot].set(buf));
    r
}

/// `C = A B` (or `C += A B` when `acc`) for `A (m x k)`, `B (k x n)` with any strides and `C`
/// row-major with row stride `c_rs`, rounding A and B to bf16 and summing in f32, on `kernel`
/// ([`Kernel::Best`] but in tests, which compare them). Runs on rayon's pool; panics when the
/// CPU lacks the kernel asked for.
///
/// # Safety
/// The three matrices must be valid for their shapes and strides, and `C` must not overlap them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: isize,
    acc: bool,
    a: Mat,
    b: Mat,
    kernel: Kernel,
) {
    let p = Product {
        m,
        n,
        k,
        c: OutPtr(c),
        c_rs,
        acc,
    };
    product(p, a, BSource::Now(b), kernel);
}

/// [`gemm`] and [`gemm_packed`]: an empty product, or A's layout chosen and the product driven.
unsafe fn product(p: Product, a: Mat, b: BSource, kernel: Kernel) {
    let Product {
        m,
        n,
        k,
        c,
        c_rs,
        acc,
    } = p;
    let kernel = kernel.resolve();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                std::ptr::write_bytes(c.get().offset(r as isize * c_rs), 0, n);
            }
        }
        return;
    }
    // A's rows contiguous (X W, dY Wᵀ) or its columns (Xᵀ dY, a weight's gradient). The AMX
    // kernel reads only the row layout, into which `pack_a_t` packs column-major A.
    if a.cs == 1 || a.rs != 1 || kernel == Kernel::Amx {
        drive::<true>(p, a, b, kernel);
    } else {
        drive::<false>(p, a, b, kernel);
    }
}

/// B packed once for several products by it ([`pack_b_all`], [`gemm_packed`]): the chunked
/// language-model head multiplies every chunk of rows by the same head, which [`gemm`] would pack
/// again for each.
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Rows of B (its k).
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Columns of B (its n).
    pub fn cols(&self) -> usize {
        self.n
    }
}

/// `b` (`k x n`, any strides) packed as [`gemm`] packs its B, every block of k.
///
/// # Safety
/// `b` must be valid for its shape and strides.
pub unsafe fn pack_b_all(b: Mat, k: usize, n: usize) -> PackedB {
    let mut data = vec![0u32; k.div_ceil(KC) * b_block(n)];
    pack_b_blocks(b, k, n, &mut data);
    PackedB { data, k, n }
}

/// Values of one packed block of [`KC`] rows of a B of `n` columns: its `ceil(n / NR)` panels
/// at [`KP`] pairs each (a short last block's panels are shorter, at the same block stride).
fn b_block(n: usize) -> usize {
    n.div_ceil(NR) * KP * NR
}

/// Every block of [`KC`] rows of `b` (`k x n`) packed into `out`, one after the other
/// ([`b_block`] values each), each as `ceil(n / NR)` panels by [`pack_b_panel`]
/// ([`padded_pairs`]`(kc) * NR` values each): B as [`drive`] reads it. Every panel of every
/// block is one task of one parallel loop. (A loop for each block, one after the other, started
/// and joined the threads 16 times for a weight gradient's `dy` of 4,096 rows.)
unsafe fn pack_b_blocks(b: Mat, k: usize, n: usize, out: &mut [u32]) {
    let (npan, block) = (n.div_ceil(NR), b_block(n));
    let out = &mut out[..k.div_ceil(KC) * block];
    let at = OutPtr(out.as_mut_ptr() as *mut f32);
    let task = |t: usize| {
        let (kb, j) = (t / npan, t % npan);
        let (k0, kc) = (kb * KC, KC.min(k - kb * KC));
        let panel = padded_pairs(kc) * NR;
        // SAFETY: panel (kb, j) lies inside `out` (a short last block's panels are shorter) and
        // no other task writes it; the reads stay inside b.
        unsafe {
            let dst = (at.get() as *mut u32).add(kb * block + j * panel);
            pack_b_panel(b, k0, kc, n, j, std::slice::from_raw_parts_mut(dst, panel));
        }
    };
    let tasks = k.div_ceil(KC) * npan;
    if n * k >= 1 << 16 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// [`gemm`] with B packed beforehand by [`pack_b_all`]: the same products, bit for bit.
///
/// # Safety
/// As [`gemm`], for A and C.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_packed(
    m: usize,
    c: *mut f32,
    c_rs: isize,
    acc: bool,
    a: Mat,
    b: &PackedB,
    kernel: Kernel,
) {
    let p = Product {
        m,
        n: b.n,
        k: b.k,
        c: OutPtr(c),
        c_rs,
        acc,
    };
    product(p, a, BSource::Done(&b.data), kernel);
}

/// Where [`drive`] finds B packed: to be packed now, or packed beforehand.
#[derive(Clone, Copy)]
enum BSource<'a> {
    Now(Mat),
    Done(&'a [u32]),
}

/// A product's shape and where its result goes: C, `m x n` with row stride `c_rs`, is written
/// (or, with `acc`, added to).
#[derive(Clone, Copy)]
struct Product {
    m: usize,
    n: usize,
    k: usize,
    c: OutPtr,
    c_rs: isize,
    acc: bool,
}

unsafe fn drive<const ROWS: bool>(p: Product, a: Mat, b: BSource, kernel: Kernel) {
    let Product { m, n, k, .. } = p;
    let kblocks = k.div_ceil(KC);
    // All of B is packed first, one block of KC rows after another (n x k bf16: a few MB at
    // most here), so that each task below runs its rows of C through every k block while they
    // sit in cache. So is A in the column layout, whose panels the tasks share.
    let lda = m.next_multiple_of(MR);
    let len = if let BSource::Now(_) = b {
        kblocks * b_block(n)
    } else {
        0
    };
    with_scratch(0, len, |bpack| {
        let bpack: &[u32] = match b {
            BSource::Now(b) => {
                pack_b_blocks(b, k, n, bpack);
                bpack
            }
            BSource::Done(packed) => packed,
        };
        // A's columns contiguous on the AMX kernel: all of A in the row layout, once.
        let a_t = ROWS && kernel == Kernel::Amx && a.rs == 1 && a.cs != 1;
        let len = if !ROWS || a_t { kblocks * KP * lda } else { 0 };
        with_scratch(1, len, |apacked| {
            if !ROWS {
                pack_a_cols(a, m, k, lda, apacked);
            }
            #[cfg(target_arch = "x86_64")]
            if a_t {
                pack_a_t(a, m, k, apacked);
            }
            tiles::<ROWS>(p, a, bpack, apacked, a_t, lda, kernel)
        })
    });
}

/// Every tile of C from packed B (and A in the column layout, or with `a_t` A in the row
/// layout by [`pack_a_t`]: `apacked`), in tasks over row blocks and column chunks.
unsafe fn tiles<const ROWS: bool>(
    p: Product,
    a: Mat,
    bpack: &[u32],
    apacked: &[u32],
    a_t: bool,
    lda: usize,
    kernel: Kernel,
) {
    let Product {
        m,
        n,
        k,
        c,
        c_rs,
        acc,
    } = p;
    let npan = n.div_ceil(NR);
    let (kblocks, block) = (k.div_ceil(KC), b_block(n));
    let threads = rayon::current_num_threads();
    let (mblocks, rows_of) = super::row_blocks(m, MR, MC, threads);
    // Enough tasks for every thread: the columns are split too when A has few row blocks.
    let nchunks = npan.min((4 * threads).div_ceil(mblocks)).max(1);
    let chunk = npan.div_ceil(nchunks);
    // The most rows a task packs: its blocks differ by at most one panel.
    let most = m.div_ceil(MR).div_ceil(mblocks) * MR;
    let amx = ROWS && kernel == Kernel::Amx;
    let task = |t: usize| {
        let (mb, nb) = (t / nchunks, t % nchunks);
        let (m0, mc) = rows_of(mb);
        let own_pack = ROWS && !a_t;
        let cols = nb * chunk..((nb + 1) * chunk).min(npan);
        with_scratch(2, if own_pack { most * KP } else { 0 }, |apack| {
            #[cfg(target_arch = "x86_64")]
            if amx {
                amx_configure();
            }
            for kb in 0..kblocks {
                let (k0, kc) = (kb * KC, KC.min(k - kb * KC));
                if own_pack {
                    pack_a_rows(a, m0, mc, k0, kc, apack);
                }
                let tiles = Tiles {
                    kcp: kc.div_ceil(2),
                    // Block kb's panel of B j, and its panel of A i (m0 is a multiple of MR).
                    b: bpack.as_ptr().add(kb * block),
                    b_panel: padded_pairs(kc) * NR,
                    a: if own_pack {
                        apack.as_ptr()
                    } else if ROWS {
                        apacked.as_ptr().add((kb * lda + m0) * KP)
                    } else {
                        apacked.as_ptr().add(kb * KP * lda + m0)
                    },
                    a_panel: if ROWS { MR * KP } else { MR },
                    lda,
                    c: c.get().offset(m0 as isize * c_rs),
                    c_rs,
                    rows: mc,
                    n,
                    add: acc || kb > 0,
                };
                #[cfg(target_arch = "x86_64")]
                if amx {
                    tiles.amx(cols.clone());
                    continue;
                }
                tiles.sweep::<ROWS>(cols.clone(), kernel);
            }
            #[cfg(target_arch = "x86_64")]
            if amx {
                amx_release();
            }
        })
    };
    let tasks = mblocks * nchunks;
    if tasks > 1 && m * n * k >= 1 << 18 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// One block of k of a task's tiles: its rows of C, packed A and B, and where each panel is.
struct Tiles {
    /// Pairs of k in the block.
    kcp: usize,
    /// The block's first panel of B, and the distance from one panel to the next.
    b: *const u32,
    b_panel: usize,
    /// The task's first panel of A (in the kernel's layout for `ROWS`), and the distance from
    /// one panel to the next.
    a: *const u32,
    a_panel: usize,
    /// Rows of A in the column layout ([`a_index`]).
    lda: usize,
    /// The task's first row of C.
    c: *mut f32,
    c_rs: isize,
    /// Rows of the task, and columns of C.
    rows: usize,
    n: usize,
    /// Whether C is added to (a block after the first, or `acc`).
    add: bool,
}

impl Tiles {
    /// Where tile (i, j)'s panels of A and B are, its rows and columns, and its first element.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> (*const u32, *const u32, (usize, usize), *mut f32) {
        let tile = (MR.min(self.rows - i * MR), NR.min(self.n - j * NR));
        let c = self
            .c
            .offset((i * MR) as isize * self.c_rs + (j * NR) as isize);
        (
            self.a.add(i * self.a_panel),
            self.b.add(j * self.b_panel),
            tile,
            c,
        )
    }

    /// Every tile of panels `cols` on `vdpbf16ps` or the portable kernel: for each panel of A,
    /// which stays in L1, every panel of B. (Each panel of B for every panel of A instead ran
    /// the weights' `x W` products 8-15% slower: `examples/bf16_shapes.rs`.)
    unsafe fn sweep<const ROWS: bool>(&self, cols: std::ops::Range<usize>, kernel: Kernel) {
        let mut tile = [0f32; MR * NR];
        for i in 0..self.rows.div_ceil(MR) {
            for j in cols.clone() {
                let (ap, bp, (rows, cols), c) = self.at(i, j);
                #[cfg(target_arch = "x86_64")]
                if kernel != Kernel::Portable {
                    let rc = (rows, cols);
                    kernel_native::<ROWS>(self.kcp, ap, self.lda, bp, c, self.c_rs, rc, self.add);
                    continue;
                }
                kernel_portable::<ROWS>(self.kcp, ap, self.lda, bp, &mut tile);
                store_tile(&tile, c, self.c_rs, (rows, cols), self.add);
            }
        }
    }

    /// Every tile of panels `cols` on AMX: for each panel of B, every panel of A, two at a time
    /// where both are whole.
    #[cfg(target_arch = "x86_64")]
    unsafe fn amx(&self, cols: std::ops::Range<usize>) {
        let mut tile = [0f32; MR * NR];
        for j in cols {
            let mut i = 0;
            while i < self.rows.div_ceil(MR) {
                let (ap, bp, (rows, cols), c) = self.at(i, j);
                if cols == NR && (i + 2) * MR <= self.rows {
                    // Two full panels: the next one follows this one in A's pack.
                    kernel_amx2(self.kcp, ap, bp, c, self.c_rs, self.add);
                    i += 2;
                } else if rows == MR && cols == NR {
                    kernel_amx(self.kcp, ap, bp, c, self.c_rs, self.add);
                    i += 1;
                } else {
                    // A partial tile: through `tile`, then added or copied.
                    kernel_amx(self.kcp, ap, bp, tile.as_mut_ptr(), NR as isize, false);
                    store_tile(&tile, c, self.c_rs, (rows, cols), self.add);
                    i += 1;
                }
            }
        }
    }
}

/// The first `rows` rows and `cols` columns of a tile computed into `tile` (row stride [`NR`]),
/// written to C at `c` (row stride `c_rs`), or with `add`, added to it.
unsafe fn store_tile(
    tile: &[f32; MR * NR],
    c: *mut f32,
    c_rs: isize,
    (rows, cols): (usize, usize),
    add: bool,
) {
    for r in 0..rows {
        let dst = c.offset(r as isize * c_rs);
        let src = tile.as_ptr().add(r * NR);
        if add {
            for x in 0..cols {
                *dst.add(x) += *src.add(x);
            }
        } else {
            // C may be uninitialized: written, never read.
            std::ptr::copy_nonoverlapping(src, dst, cols);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The AVX512-BF16 packers of a panel of B (rows contiguous, columns contiguous) give the bits
    /// of the value-by-value packing, at an odd and an even `kc`, a full panel and partial ones,
    /// and a panel that starts inside the rows and columns; the padding pairs are 0.
    #[test]
    fn native_panel_packers_give_the_bits_of_the_strided_one() {
        if !native() {
            eprintln!("no AVX512-BF16 on this CPU: its packers do not run here");
            return;
        }
        let (k, n) = (300, 70);
        // Values with low bits that round both ways, a NaN and an infinity among them.
        let mut v: Vec<f32> = (0..k * n)
            .map(|i| ((i as u32).wrapping_mul(2654435761) % 4001) as f32 / 997.0 - 2.0)
            .collect();
        v[5] = f32::NAN;
        v[77] = f32::INFINITY;
        for (kc, k0, c0, cols) in [
            (33, 0, 0, 32),
            (1, 299, 32, 7),
            (256, 40, 38, 32),
            (255, 3, 64, 6),
        ] {
            let len = padded_pairs(kc) * NR;
            for (rs, cs) in [(n as isize, 1), (1, k as isize)] {
                let b = Mat {
                    ptr: v.as_ptr(),
                    rs,
                    cs,
                };
                let (mut got, mut want) = (vec![7u32; len], vec![9u32; len]);
                unsafe {
                    if cs == 1 {
                        pack_b_rows_native(b, k0, kc, c0, cols, &mut got);
                    } else {
                        pack_b_cols_native(b, k0, kc, c0, cols, &mut got);
                    }
                    pack_b_panel_strided(b, k0, kc, c0, cols, &mut want);
                }
                assert_eq!(
                    got, want,
                    "kc {kc} from row {k0}, {cols} columns from {c0}, strides ({rs}, {cs})"
                );
            }
        }
    }
}
