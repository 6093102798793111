//! The fused kernels on burn `flex` tensors: forward and backward passes written out by hand.
//!
//! Each kernel replaces a chain of burn's generic ops that each walk the whole tensor (and, under
//! autodiff, record a node and allocate an output): attention is one task per head that computes
//! scores, the masked softmax and the output while the head's score matrix sits in cache; the
//! log-probability of target tokens is one pass per row of logits; SwiGLU is one pass. Matrix
//! products call `gemm`, the crate burn's `flex` uses for its own matmul, directly with the
//! inputs' strides, so no operand is copied to make it contiguous (but a mask stored transposed,
//! which attention copies once into rows).

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{DType, Shape, TensorData};
use rayon::prelude::*;

use super::small::gemm;
use super::{bf16, simd, skinny, small, team};

/// A raw pointer that may cross into rayon tasks; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// The pointer (a method, so closures capture the whole `Ptr`, not its raw field).
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// A read-only strided view of an f32 tensor.
struct View<'a> {
    data: &'a [f32],
    offset: isize,
    strides: Vec<isize>,
    dims: Vec<usize>,
}

impl<'a> View<'a> {
    fn new(t: &'a FlexTensor) -> Self {
        assert_eq!(t.dtype(), DType::F32, "fused kernels compute in f32");
        let layout = t.layout();
        View {
            data: t.storage::<f32>(),
            offset: layout.start_offset() as isize,
            strides: layout.strides().to_vec(),
            dims: layout.shape().to_vec(),
        }
    }

    /// Head `(bi, g)` of a `(B, H, S, hd)` view transposed, `(hd, S)` row-major: the B operand
    /// with contiguous rows that [`small::gemm`] runs without packing.
    fn head_t(&self, bi: usize, g: usize) -> Vec<f32> {
        let (s, hd) = (self.dims[2], self.dims[3]);
        let (src, rs, cs) = (self.ptr(&[bi, g]), self.strides[2], self.strides[3]);
        // SAFETY: the head's s x hd elements lie in the view; `transpose` writes all of `t`.
        written(hd * s, |t| unsafe {
            small::transpose(src, s, hd, rs, cs, t)
        })
    }

    /// Pointer to the element at `index` (leading dimensions; the rest are 0).
    fn ptr(&self, index: &[usize]) -> *const f32 {
        let off: isize = self.offset
            + index
                .iter()
                .zip(&self.strides)
                .map(|(i, s)| *i as isize * s)
                .sum::<isize>();
        // SAFETY: the layout keeps every in-range index inside the storage.
        unsafe { self.data.as_ptr().offset(off) }
    }
}

pub(super) fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// A tensor whose logical dims are `(B, H, T, hd)` stored as `(B, T, H, hd)`, so that the
/// `swap_dims(1, 2).reshape(..)` every attention caller does next is free.
fn heads_last(data: Vec<f32>, [b, h, t, hd]: [usize; 4]) -> FlexTensor {
    let base = tensor(data, vec![b, t, h, hd]);
    let layout = Layout::new(
        Shape::from(vec![b, h, t, hd]),
        vec![(t * h * hd) as isize, hd as isize, (h * hd) as isize, 1],
        0,
    );
    base.with_layout(layout)
}

/// What the attention backward pass needs from the forward pass.
#[derive(Debug, Clone)]
pub struct AttnSaved {
    pub q: FlexTensor,
    pub k: FlexTensor,
    pub v: FlexTensor,
    /// The attention probabilities, `(B, H, T, S)` contiguous (0 outside each tile's keys), or
    /// `None` where they would take more than [`keep_probs_max`] bytes: the backward pass then
    /// computes each head's again from q, k and the mask.
    pub p: Option<FlexTensor>,
    /// The additive mask, from which the probabilities are computed again where `p` is `None`
    /// (the caller's tensor, shared, not copied).
    pub mask: FlexTensor,
    /// The output, `(B, H, T, hd)`: each row's Σ_j dp_ij p_ij of the softmax's gradient is
    /// dout_i · out_i (FlashAttention's D), a dot product over hd instead of over the keys.
    pub out: FlexTensor,
    pub scale: f32,
    /// The row tiles the forward pass computed, per batch row of the mask.
    pub tiles: Vec<Vec<Tile>>,
}

/// The most bytes of attention probabilities one call keeps for its backward pass, unless
/// `KILN_ATTN_KEEP_MB` (MiB) or [`set_keep_probs_max`] says otherwise: 32 MiB. A call's
/// probabilities are `B x H x T x S` f32, quadratic in the context: a `tiny` training half-batch
/// keeps 8 MiB and a `small` one 32, but at a 2,048-token context `tiny`'s 4-row halves would
/// keep 256 MiB in each layer. Past the budget the backward pass computes the probabilities
/// again (the scores' product and the softmax once more), tile by tile into one `T x S` block
/// per task. Measured on a 2-core Zen 4 (`examples/half_step_pairs.rs`, `recompute`; `kiln bench
/// --ctx`): recomputing cost 1-2% of a `tiny` half-step and 0.6% of a `small` one, was even at
/// a 1,024-token context, and at 2,048 tokens (`tiny`, 8 rows) ran 3,810-4,130 tokens/s against
/// 3,380-4,010 keeping them, in 1,576 MiB against 3,496-3,624.
pub fn keep_probs_max() -> usize {
    KEEP_PROBS_MAX.get()
}

static KEEP_PROBS_MAX: super::MibBudget = super::MibBudget::new("KILN_ATTN_KEEP_MB", 32);

/// Sets [`keep_probs_max`] in bytes for the rest of the process (0: never keep them).
pub fn set_keep_probs_max(bytes: usize) {
    KEEP_PROBS_MAX.set(bytes)
}

/// A mask entry at or below this adds so much to a score that its probability is exactly 0
/// (`simd::exp` is 0 below -87.3): Kiln masks with [`crate::MASKED`] (-1e30), others with -1e9
/// or -inf.
const CLOSED: f32 = -1e9;

/// Most query rows in one tile: smaller tiles follow a causal mask's diagonal more closely (less
/// masked work) but make more, smaller products.
const TILE_ROWS: usize = 32;

/// Query rows `rows` of one attention call and the key columns `keys` they read: outside
/// `keys` every one of those rows' mask entries is [`CLOSED`], so their probabilities are
/// exactly 0 and the products skip them.
#[derive(Debug, Clone)]
pub struct Tile {
    pub rows: std::ops::Range<usize>,
    pub keys: std::ops::Range<usize>,
}

/// The first entry of `row` above [`CLOSED`], 16 at a time (a branch-free test of each chunk,
/// which the compiler vectorizes; a causal mask row is mostly closed).
fn first_open(row: &[f32]) -> Option<usize> {
    let mut base = 0;
    for c in row.chunks(16) {
        if c.iter().fold(false, |any, &x| any | (x > CLOSED)) {
            return c.iter().position(|&x| x > CLOSED).map(|j| base + j);
        }
        base += c.len();
    }
    None
}

/// The last entry of `row` above [`CLOSED`], as [`first_open`] from the end.
fn last_open(row: &[f32]) -> Option<usize> {
    let mut end = row.len();
    for c in row.rchunks(16) {
        end -= c.len();
        if c.iter().fold(false, |any, &x| any | (x > CLOSED)) {
            return c.iter().rposition(|&x| x > CLOSED).map(|j| end + j);
        }
    }
    None
}

static TILES: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);
const UNSET: u8 = 2;

/// Whether attention skips closed keys tile by tile; `KILN_ATTN_TILES=0` (or
/// [`set_tiles_enabled`]) runs every product dense over all keys, for comparisons.
pub fn tiles_enabled() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match TILES.load(Relaxed) {
        UNSET => {
            let on = std::env::var_os("KILN_ATTN_TILES").is_none_or(|v| v != "0");
            TILES.store(on as u8, Relaxed);
            on
        }
        on => on == 1,
    }
}

/// Turns [`tiles_enabled`] on or off for the rest of the process (benchmarks alternate them).
pub fn set_tiles_enabled(on: bool) {
    TILES.store(on as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The tiles of `t` query rows over `s` keys for each batch row of the mask (`(Bm, 1, Tm, S)`,
/// Bm and Tm 1 or full). Each row's open keys span from its first entry above [`CLOSED`] to its
/// last (a row with none reads them all, as the dense softmax does: uniform); consecutive rows
/// whose spans start at the same key share a tile of at most [`TILE_ROWS`] rows, and
/// neighbouring tiles with the same keys merge. A causal mask gives tiles along the diagonal
/// (about half the dense products); packed segments (block-diagonal masks) give tiles inside
/// each segment; a mask with nothing closed gives one tile, the dense product.
fn mask_tiles(mv: &View, t: usize, s: usize) -> Vec<Vec<Tile>> {
    let (bm, tm) = (mv.dims[0], mv.dims[2]);
    debug_assert!(
        s <= 1 || mv.strides[3] == 1,
        "mask rows in place (`attention`)"
    );
    // The open span of every mask row, in parallel (a scan of the whole mask).
    let span = |r: usize| {
        let mp = mv.ptr(&[r / tm, 0, r % tm]);
        // SAFETY: a mask row of s contiguous entries (`attention` makes them so).
        let row = unsafe { std::slice::from_raw_parts(mp, s) };
        match (first_open(row), last_open(row)) {
            (Some(lo), Some(hi)) => lo..hi + 1,
            _ => 0..s,
        }
    };
    let spans: Vec<std::ops::Range<usize>> = if bm * tm * s < 1 << 16 {
        (0..bm * tm).map(span).collect()
    } else {
        (0..bm * tm).into_par_iter().map(span).collect()
    };
    spans
        .chunks(tm)
        .map(|spans| {
            // row i's span (one mask row may serve every query row)
            let row = |i: usize| &spans[if tm == 1 { 0 } else { i }];
            let mut tiles: Vec<Tile> = Vec::new();
            let mut i = 0;
            while i < t {
                let (lo, mut hi) = (row(i).start, row(i).end);
                let mut j = i + 1;
                while j < t && j - i < TILE_ROWS && row(j).start == lo {
                    hi = hi.max(row(j).end);
                    j += 1;
                }
                match tiles.last_mut() {
                    Some(last) if last.keys == (lo..hi) => last.rows.end = j,
                    _ => tiles.push(Tile {
                        rows: i..j,
                        keys: lo..hi,
                    }),
                }
                i = j;
            }
            tiles
        })
        .collect()
}

/// Most keys in one of the backward pass's key tiles.
const TILE_KEYS: usize = 64;

/// The key tiles of `s` keys for the row tiles `rows` of one mask row: keys in runs of at most
/// [`TILE_KEYS`] that start a new run where a row tile's keys start, each with the span of rows
/// whose tiles read any of its keys (empty where none does). The backward pass's dk and dv run
/// over these: a product over all the rows that read a run of keys, not one per row tile.
fn key_tiles(rows: &[Tile], s: usize) -> Vec<Tile> {
    let mut starts: Vec<usize> = rows.iter().map(|r| r.keys.start).chain([0]).collect();
    starts.sort_unstable();
    starts.dedup();
    let mut tiles = Vec::new();
    for (n, &from) in starts.iter().enumerate() {
        let to = starts.get(n + 1).copied().unwrap_or(s);
        for k0 in (from..to).step_by(TILE_KEYS) {
            let keys = k0..(k0 + TILE_KEYS).min(to);
            let reading = rows
                .iter()
                .filter(|r| r.keys.start < keys.end && keys.start < r.keys.end);
            let lo = reading.clone().map(|r| r.rows.start).min();
            let hi = reading.map(|r| r.rows.end).max();
            tiles.push(Tile {
                rows: lo.unwrap_or(0)..hi.unwrap_or(0),
                keys,
            });
        }
    }
    tiles
}

/// Scores `q kᵀ · scale` of head `hi` of batch row `bi` (`kt` its key/value head's kᵀ, `(hd,
/// S)`) and their softmax with mask row block `mb`, into the head's `(T, S)` block `pbh`, tile by
/// tile over `tiles`, calling `then` with each tile as soon as its probabilities are written (the
/// forward pass's product with v reads them while they are still in cache: at a long context
/// the block is tens of MiB; `tiny`'s forward pass at 2,048 tokens, 4 rows, ran 4-7% faster
/// than with every tile's scores first, in 3 of 4 alternating pairs of `kiln bench`). Only the
/// entries inside each tile's keys are written: where anything reads the rest (the backward
/// pass's key tiles), the caller sets it to 0 ([`zero_outside_tiles`]).
///
/// # Safety
/// `pbh` must be valid for writes of `T x S` f32, and `kt` hold `hd x S`.
#[allow(clippy::too_many_arguments)]
unsafe fn probs(
    qv: &View,
    kt: &[f32],
    mv: &View,
    [bi, hi, mb]: [usize; 3],
    tiles: &[Tile],
    scale: f32,
    pbh: *mut f32,
    mut then: impl FnMut(&Tile),
) {
    let (hd, s) = (qv.dims[3], mv.dims[3]);
    for tile in tiles {
        let Tile { rows, keys } = tile;
        // Scores: (rows, hd) x (hd, keys).
        gemm(
            rows.len(),
            keys.len(),
            hd,
            pbh.add(rows.start * s + keys.start),
            s as isize,
            false,
            qv.ptr(&[bi, hi, rows.start]),
            qv.strides[2],
            qv.strides[3],
            kt.as_ptr().add(keys.start),
            s as isize,
            1,
            scale,
        );
        softmax_rows(mv, mb, std::slice::from_ref(tile), pbh);
        then(tile);
    }
}

/// `a[tile.rows, tile.keys] x[tile.keys]` for a `(T, S)` block `a` (rows `s` apart) and head
/// `[bi, g]` of a `(B, KV, S, hd)` view `x`: `(rows, keys) x (keys, hd)`, written into the
/// tile's rows of a head whose rows lie `h * hd` apart (`(B, T, H, hd)` storage) at `dst`. The
/// forward pass's output `p v` and the backward pass's `dq = ds k`.
///
/// # Safety
/// `a` must hold the tile's entries, `dst` be valid for the tile's rows.
unsafe fn tile_times(
    Tile { rows, keys }: &Tile,
    a: *const f32,
    s: usize,
    x: &View,
    [bi, g]: [usize; 2],
    dst: *mut f32,
    h: usize,
) {
    let hd = x.dims[3];
    gemm(
        rows.len(),
        hd,
        keys.len(),
        dst.add(rows.start * h * hd),
        (h * hd) as isize,
        false,
        a.add(rows.start * s + keys.start),
        s as isize,
        1,
        x.ptr(&[bi, g, keys.start]),
        x.strides[2],
        x.strides[3],
        1.0,
    )
}

/// Sets each row of the `(T, S)` block `p` to 0 outside its tile's keys.
///
/// # Safety
/// `p` must be valid for writes of `T x S` f32.
unsafe fn zero_outside_tiles(tiles: &[Tile], s: usize, p: *mut f32) {
    for Tile { rows, keys } in tiles {
        for i in rows.clone() {
            std::ptr::write_bytes(p.add(i * s), 0, keys.start);
            std::ptr::write_bytes(p.add(i * s + keys.end), 0, s - keys.end);
        }
    }
}

/// The masked softmax of each row of scores in the `(T, S)` block `pbh` over its tile's keys, in
/// place, with mask row block `mb`.
///
/// # Safety
/// `pbh` must hold each tile's rows' scores over its keys.
unsafe fn softmax_rows(mv: &View, mb: usize, tiles: &[Tile], pbh: *mut f32) {
    let s = mv.dims[3];
    debug_assert!(
        s <= 1 || mv.strides[3] == 1,
        "mask rows in place (`attention`)"
    );
    for Tile { rows, keys } in tiles {
        for i in rows.clone() {
            let row = std::slice::from_raw_parts_mut(pbh.add(i * s + keys.start), keys.len());
            let mi = if mv.dims[2] == 1 { 0 } else { i };
            // the tile's keys of a mask row of s contiguous entries
            let m = std::slice::from_raw_parts(mv.ptr(&[mb, 0, mi]).add(keys.start), keys.len());
            simd::add(row, m);
            let mx = simd::max(row);
            let sum = simd::exp_shift_sum(row, mx);
            simd::scale(row, 1.0 / sum);
        }
    }
}

/// A block of `n` f32 that is written before it is read (the probabilities' and their
/// gradient's `(T, S)` blocks, where only the tiles' entries are computed): not zeroed, since at
/// a long context a block is tens of MiB (a `tiny` head at 2,048 tokens: 16 MiB).
fn block(n: usize) -> Vec<simd::Out> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialization.
    unsafe { v.set_len(n) };
    v
}

/// softmax(q kᵀ · scale + mask) v for `q (B, H, T, hd)`, `k, v (B, KV, S, hd)` (H a multiple of
/// KV: grouped-query heads share key/value heads without copying them), `mask` additive and
/// broadcastable to `(B, 1, T, S)`. Any strides. Returns the output `(B, H, T, hd)` (stored
/// `(B, T, H, hd)`) and, when `keep` is set, what the backward pass needs.
pub fn attention(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: FlexTensor,
    scale: f32,
    keep: bool,
) -> (FlexTensor, Option<AttnSaved>) {
    // A mask whose keys are not adjacent (a transposed view) is copied once here, so that the
    // tile scan and every head's softmax, forward and backward, read mask rows in place. Kiln's
    // own masks are stored by rows and are not copied.
    let mask = if View::new(&mask).strides[3] == 1 {
        mask
    } else {
        mask.to_contiguous()
    };
    let (qv, kv, vv, mv) = (
        View::new(&q),
        View::new(&k),
        View::new(&v),
        View::new(&mask),
    );
    let [b, h, t, hd] = <[usize; 4]>::try_from(qv.dims.clone()).expect("q is (B, H, T, hd)");
    let [kb, kvh, s, khd] = <[usize; 4]>::try_from(kv.dims.clone()).expect("k is (B, KV, S, hd)");
    assert!(
        kb == b && khd == hd && h % kvh == 0 && vv.dims == kv.dims,
        "attention shapes: q {:?}, k {:?}, v {:?}",
        qv.dims,
        kv.dims,
        vv.dims
    );
    assert!(
        mv.dims.len() == 4
            && (mv.dims[0] == b || mv.dims[0] == 1)
            && (mv.dims[2] == t || mv.dims[2] == 1)
            && mv.dims[3] == s,
        "attention mask {:?} does not broadcast to ({b}, 1, {t}, {s})",
        mv.dims
    );
    let rep = h / kvh;
    let decode = t == 1 && qv.strides[3] == 1 && kv.strides[3] == 1 && vv.strides[3] == 1;
    // Decoding adds each value row into its output row, so that output starts at 0. Otherwise
    // every head's product writes its whole (T, hd) block, and the output is not zeroed first
    // (nor, below, the kept probabilities: see `written`).
    let n_out = b * t * h * hd;
    let mut out = product_out(n_out, decode || s == 0);
    let out_ptr = Ptr(out.as_mut_ptr());
    // Decoding reads every cached key (one row: nothing to skip); otherwise the products run
    // tile by tile over the keys each tile's rows may see.
    let tiles = if decode || t * s == 0 || !tiles_enabled() {
        vec![
            vec![Tile {
                rows: 0..t,
                keys: 0..s
            }];
            mv.dims[0]
        ]
    } else {
        mask_tiles(&mv, t, s)
    };
    // The probabilities are kept for the backward pass up to `keep_probs_max` bytes; past it
    // (long contexts) the backward pass computes them again, head by head.
    let keep_p = keep && b * h * t * s * 4 <= keep_probs_max();
    let head = |bh: usize, pbh: &mut [simd::Out]| {
        let (bi, hi) = (bh / h, bh % h);
        let (g, mb) = (hi / rep, if mv.dims[0] == 1 { 0 } else { bi });
        let tiles = &tiles[mb];
        let out_head = out_ptr.at((bi * t * h + hi) * hd);
        if decode {
            // One query row (decoding with the cache): dot products and a weighted sum of
            // value rows. gemm's packing costs more than the arithmetic at this size.
            let qrow = unsafe { std::slice::from_raw_parts(qv.ptr(&[bi, hi]), hd) };
            for (j, x) in pbh.iter_mut().enumerate() {
                let krow = unsafe { std::slice::from_raw_parts(kv.ptr(&[bi, g, j]), hd) };
                x.write(simd::dot(qrow, krow) * scale);
            }
            let (n, pp) = (pbh.len(), pbh.as_mut_ptr().cast::<f32>());
            // SAFETY: every score was written just above.
            unsafe { softmax_rows(&mv, mb, tiles, pp) };
            // SAFETY: every probability was written just above.
            let p_row = unsafe { std::slice::from_raw_parts(pp, n) };
            let orow = unsafe { std::slice::from_raw_parts_mut(out_head, hd) };
            for (j, &pj) in p_row.iter().enumerate() {
                if pj != 0.0 {
                    let vrow = unsafe { std::slice::from_raw_parts(vv.ptr(&[bi, g, j]), hd) };
                    simd::axpy(orow, pj, vrow);
                }
            }
        } else if hd == 0 {
            // No output; the probabilities (kept for the backward pass) of scores all 0.
            pbh.fill(simd::Out::new(0.0));
            // SAFETY: every score was written just above.
            unsafe { softmax_rows(&mv, mb, tiles, pbh.as_mut_ptr().cast()) };
        } else {
            // Scores, softmax and the output, tile by tile. Probabilities outside a tile's keys
            // are exactly 0; only the backward pass reads them (its key tiles span rows of
            // several row tiles), so they are written only where they are kept.
            let pp = pbh.as_mut_ptr().cast::<f32>();
            let kt = kv.head_t(bi, g);
            // Output rows: p v, into the (B, T, H, hd) buffer.
            let output =
                |tile: &Tile| unsafe { tile_times(tile, pp, s, &vv, [bi, g], out_head, h) };
            let at = [bi, hi, mb];
            // SAFETY: the block is the head's T x S, kᵀ its hd x S.
            unsafe {
                if keep_p {
                    zero_outside_tiles(tiles, s, pp);
                }
                probs(&qv, &kt, &mv, at, tiles, scale, pp, output);
            }
        }
    };
    // The probabilities of every head are kept only for a backward pass, within the budget;
    // otherwise each task works in a scratch block of its own. Small problems (decoding one
    // sequence) run on this thread: a rayon task costs more.
    let serial = b * h * t * s * hd < 1 << 17;
    let p = if keep_p {
        let p = written(b * h * t * s, |p| {
            if t * s == 0 {
                return;
            }
            if serial {
                p.chunks_mut(t * s)
                    .enumerate()
                    .for_each(|(bh, pbh)| head(bh, pbh));
            } else {
                p.par_chunks_mut(t * s)
                    .enumerate()
                    .for_each(|(bh, pbh)| head(bh, pbh));
            }
        });
        Some(p)
    } else {
        // Each task's block is used again for its next head: only the tiles' entries are
        // written and read.
        if serial {
            let mut p = block(t * s);
            (0..b * h).for_each(|bh| head(bh, &mut p));
        } else if decode {
            // A decoding step's products run on `team`'s helpers, which it keeps spinning: its
            // heads go to them too, rather than waking rayon's worker between two products.
            let scratch = |bh: usize| head(bh, &mut block(t * s));
            team::for_each(b * h, rayon::current_num_threads(), &scratch);
        } else {
            // Longer forward passes (prefill, scoring) run their products on rayon's pool.
            (0..b * h)
                .into_par_iter()
                .for_each_init(|| block(t * s), |p, bh| head(bh, p));
        }
        None
    };
    // SAFETY: every head wrote its block of the output (or the output was zeroed).
    unsafe { out.set_len(n_out) };
    let out = heads_last(out, [b, h, t, hd]);
    let saved = keep.then(|| AttnSaved {
        q,
        k,
        v,
        p: p.map(|p| tensor(p, vec![b, h, t, s])),
        mask,
        out: out.clone(),
        scale,
        tiles,
    });
    (out, saved)
}

/// Gradients of [`attention`] with respect to q, k and v, given the output's gradient `dout`
/// `(B, H, T, hd)` (any strides). dq is `(B, H, T, hd)` stored `(B, T, H, hd)`; dk and dv are
/// `(B, KV, S, hd)` stored `(B, S, KV, hd)`.
pub fn attention_backward(
    saved: AttnSaved,
    dout: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let AttnSaved {
        q,
        k,
        v,
        p,
        mask,
        out,
        scale,
        tiles,
    } = saved;
    let (qv, kv, vv, pv, mv, dov, ov) = (
        View::new(&q),
        View::new(&k),
        View::new(&v),
        p.as_ref().map(View::new),
        View::new(&mask),
        View::new(&dout),
        View::new(&out),
    );
    let [b, h, t, hd] = <[usize; 4]>::try_from(qv.dims.clone()).unwrap();
    let [_, kvh, s, _] = <[usize; 4]>::try_from(kv.dims.clone()).unwrap();
    assert_eq!(dov.dims, qv.dims, "attention output gradient shape");
    let rep = h / kvh;
    // Each of dq's rows is written by the one product of its row tile, and each of dk's and
    // dv's by the first head of its group in its key tile's product (the others add to it), so
    // nothing is zeroed first unless a product is empty.
    let (nq, nk) = (b * t * h * hd, b * s * kvh * hd);
    let empty = t == 0 || s == 0 || hd == 0;
    let (mut dq, mut dk, mut dv) = (
        product_out(nq, empty),
        product_out(nk, empty),
        product_out(nk, empty),
    );
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Ptr(dq.as_mut_ptr()),
        Ptr(dk.as_mut_ptr()),
        Ptr(dv.as_mut_ptr()),
    );
    let key_tiles: Vec<Vec<Tile>> = tiles.iter().map(|r| key_tiles(r, s)).collect();
    // One task per key/value head: the heads that share it accumulate into its dk and dv.
    (0..if empty { 0 } else { b * kvh })
        .into_par_iter()
        .for_each(|bg| {
            let (bi, g) = (bg / kvh, bg % kvh);
            let mb = if tiles.len() == 1 { 0 } else { bi };
            let (tiles, key_tiles) = (&tiles[mb], &key_tiles[mb]);
            // Probabilities not kept: each head's computed again, tile by tile, into one block
            // (from kᵀ); kept: an empty block. ds and that block are 0 outside the row tiles'
            // keys, as kept probabilities are, which the key tiles' products read: every head
            // of the task has this batch row's tiles, so that is set once (the block's for the
            // first head, tile by tile as it is computed).
            let kt = pv.is_none().then(|| kv.head_t(bi, g));
            let mut p_block = block(if kt.is_some() { t * s } else { 0 });
            let mut ds_block = block(t * s);
            let (p_recomputed, ds): (*mut f32, *mut f32) =
                (p_block.as_mut_ptr().cast(), ds_block.as_mut_ptr().cast());
            // SAFETY: the block is T x S.
            unsafe { zero_outside_tiles(tiles, s, ds) };
            // vᵀ, dp's B operand.
            let vt = vv.head_t(bi, g);
            let kv_row = (kvh * hd) as isize;
            let dk_g = dk_ptr.at((bi * s * kvh + g) * hd);
            let dv_g = dv_ptr.at((bi * s * kvh + g) * hd);
            for r in 0..rep {
                let hi = g * rep + r;
                let p_bh = pv
                    .as_ref()
                    .map_or(p_recomputed.cast_const(), |pv| pv.ptr(&[bi, hi]));
                let do_bh = dov.ptr(&[bi, hi]);
                // By row tile, over the keys each one reads: ds and dq.
                for tile in tiles {
                    if let Some(kt) = &kt {
                        // The tile's probabilities, computed again just before they are read
                        // (`tiny` at 2,048 tokens: even with the whole head's first, medians of
                        // 1.024 over 5 pairs at 4 rows and 1.006 over 4 at 8).
                        let (at, tile) = ([bi, hi, mb], std::slice::from_ref(tile));
                        // SAFETY: the block is the head's T x S, kᵀ its hd x S.
                        unsafe {
                            if r == 0 {
                                zero_outside_tiles(tile, s, p_recomputed);
                            }
                            probs(&qv, kt, &mv, at, tile, scale, p_recomputed, |_| ());
                        }
                    }
                    let Tile { rows, keys } = tile;
                    let (m, n) = (rows.len(), keys.len());
                    let ds_tile = unsafe { ds.add(rows.start * s + keys.start) };
                    unsafe {
                        // dp = dout vᵀ: (rows, hd) x (hd, keys).
                        gemm(
                            m,
                            n,
                            hd,
                            ds_tile,
                            s as isize,
                            false,
                            do_bh.offset(rows.start as isize * dov.strides[2]),
                            dov.strides[2],
                            dov.strides[3],
                            vt.as_ptr().add(keys.start),
                            s as isize,
                            1,
                            1.0,
                        );
                    }
                    for i in rows.clone() {
                        let range = i * s + keys.start..i * s + keys.end;
                        let pr = unsafe { std::slice::from_raw_parts(p_bh.add(range.start), n) };
                        let dsr = unsafe { std::slice::from_raw_parts_mut(ds.add(range.start), n) };
                        // Σ_j dp_ij p_ij = dout_i · out_i: a dot over hd, not over the keys.
                        let r = row_dot(&dov, &ov, [bi, hi, i], hd);
                        simd::softmax_grad(dsr, pr, r, scale);
                    }
                    // dq = ds k
                    let dq_head = dq_ptr.at((bi * t * h + hi) * hd);
                    unsafe { tile_times(tile, ds, s, &kv, [bi, g], dq_head, h) };
                }
                // By key tile, over the rows that read it: dv and dk (a product over many rows
                // packs better than one per row tile).
                for Tile { rows, keys } in key_tiles {
                    let (m, n) = (rows.len(), keys.len());
                    let (dv_k, dk_k) = unsafe {
                        (
                            dv_g.offset(keys.start as isize * kv_row),
                            dk_g.offset(keys.start as isize * kv_row),
                        )
                    };
                    if m == 0 {
                        // keys no row reads: no gradient
                        for j in 0..n as isize {
                            unsafe {
                                std::ptr::write_bytes(dv_k.offset(j * kv_row), 0, hd);
                                std::ptr::write_bytes(dk_k.offset(j * kv_row), 0, hd);
                            }
                        }
                        continue;
                    }
                    // dst[keys] (+)= a[rows, keys]ᵀ x[rows]: (keys, rows) x (rows, hd), a stored
                    // (T, S) with rows of s, x's rows at `x_rs` and its columns at `x_cs`.
                    let add_t = |dst: *mut f32, a: *const f32, x: *const f32, x_rs, x_cs| unsafe {
                        gemm(
                            n,
                            hd,
                            m,
                            dst,
                            kv_row,
                            r > 0,
                            a.add(rows.start * s + keys.start),
                            1,
                            s as isize,
                            x,
                            x_rs,
                            x_cs,
                            1.0,
                        )
                    };
                    let do_rows = do_bh.wrapping_offset(rows.start as isize * dov.strides[2]);
                    add_t(dv_k, p_bh, do_rows, dov.strides[2], dov.strides[3]); // dv (+)= pᵀ dout
                    let q_rows = qv.ptr(&[bi, hi, rows.start]);
                    add_t(dk_k, ds, q_rows, qv.strides[2], qv.strides[3]);
                    // dk (+)= dsᵀ q
                }
            }
        });
    // SAFETY: the products above wrote every element (or the buffers were zeroed).
    unsafe {
        dq.set_len(nq);
        dk.set_len(nk);
        dv.set_len(nk);
    }
    (
        heads_last(dq, [b, h, t, hd]),
        heads_last(dk, [b, kvh, s, hd]),
        heads_last(dv, [b, kvh, s, hd]),
    )
}

/// The dot product of row `at` (`[b, h, t]`, `hd` long) of two `(B, H, T, hd)` views.
fn row_dot(x: &View, y: &View, at: [usize; 3], hd: usize) -> f32 {
    let (px, py) = (x.ptr(&at), y.ptr(&at));
    if x.strides[3] == 1 && y.strides[3] == 1 {
        // SAFETY: rows of hd contiguous values inside the views.
        unsafe {
            simd::dot(
                std::slice::from_raw_parts(px, hd),
                std::slice::from_raw_parts(py, hd),
            )
        }
    } else {
        let (sx, sy) = (x.strides[3], y.strides[3]);
        // SAFETY: j < hd stays inside each row.
        (0..hd as isize)
            .map(|j| unsafe { *px.offset(j * sx) * *py.offset(j * sy) })
            .sum()
    }
}

/// Target ids as usize, whatever integer type the backend stores them in.
fn ids(t: &FlexTensor) -> Vec<usize> {
    let c = t.to_contiguous();
    match c.dtype() {
        DType::I64 => c.storage::<i64>().iter().map(|&x| x as usize).collect(),
        DType::I32 => c.storage::<i32>().iter().map(|&x| x as usize).collect(),
        DType::U32 => c.storage::<u32>().iter().map(|&x| x as usize).collect(),
        other => panic!("token ids must be integers, got {other:?}"),
    }
}

/// The tensor itself when its elements are one dense run starting at offset 0, else a copy that is.
pub(super) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.layout().start_offset() == 0 && t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The elements of a tensor made by [`contiguous`].
pub(super) fn elems(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// Target ids checked against the vocabulary, one per row of `n`.
fn target_ids(targets: &FlexTensor, n: usize, vocab: usize) -> Vec<usize> {
    let ids = ids(targets);
    assert_eq!(ids.len(), n, "one target per row of logits");
    if let Some(&bad) = ids.iter().find(|&&i| i >= vocab) {
        panic!("target token {bad} is outside the vocabulary of {vocab}");
    }
    ids
}

/// For each row of `x` (rows of `vocab` logits): `lse` its log-sum-exp and `lp` the
/// log-probability of its target `ids[i]`; the rows in parallel.
fn logprob_rows(x: &[f32], vocab: usize, ids: &[usize], lp: &mut [f32], lse: &mut [f32]) {
    lp.par_iter_mut()
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(i, (lp, lse))| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let m = simd::max(row);
            *lse = m + simd::sum_exp_shift(row, m).ln();
            *lp = row[ids[i]] - *lse;
        });
}

/// [`logprob_rows`] and each row's entropy `ent`: its log-sum-exp and expected logit from one
/// pass over it (H = lse - Σ p x).
fn logprob_entropy_rows(
    x: &[f32],
    vocab: usize,
    ids: &[usize],
    (lp, lse, ent): (&mut [f32], &mut [f32], &mut [f32]),
) {
    lp.par_iter_mut()
        .zip(lse.par_iter_mut())
        .zip(ent.par_iter_mut())
        .enumerate()
        .for_each(|(i, ((lp, lse), ent))| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let m = simd::max(row);
            let (z, ex) = simd::sum_exp_shift_dot(row, m);
            *lse = m + z.ln();
            *lp = row[ids[i]] - *lse;
            *ent = *lse - ex / z;
        });
}

/// Each row of logits `buf` (rows of `vocab`) replaced by its gradient g_i (onehot(ids[i]) -
/// softmax(row)), from the row's log-sum-exp, plus with `ent` = (H, g_H) the gradient of the
/// row's entropy H_i scaled by g_H,i; the rows in parallel.
fn logprob_grad_rows(
    buf: &mut [f32],
    vocab: usize,
    ids: &[usize],
    lse: &[f32],
    g: &[f32],
    ent: Option<(&[f32], &[f32])>,
) {
    buf.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
        match ent {
            Some((h, gh)) => simd::neg_softmax_entropy_scaled(row, lse[i], g[i], gh[i], h[i]),
            None => simd::neg_softmax_scaled(row, lse[i], g[i]),
        }
        row[ids[i]] += g[i];
    });
}

/// log softmax(logits)[target] for each row of `logits (N, V)`; returns the log-probabilities
/// `(N)` and each row's log-sum-exp `(N)` (what the backward pass needs).
pub fn token_logprobs(logits: &FlexTensor, targets: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = logits.layout().shape().to_vec();
    let [n, vocab] = <[usize; 2]>::try_from(shape).expect("logits are (N, V)");
    let ids = target_ids(targets, n, vocab);
    let x = contiguous(logits.clone());
    let mut lp = vec![0f32; n];
    let mut lse = vec![0f32; n];
    logprob_rows(elems(&x), vocab, &ids, &mut lp, &mut lse);
    (tensor(lp, vec![n]), tensor(lse, vec![n]))
}

/// Bytes of logits one chunk of [`head_chunks`] holds: 64 MiB, or [`HEAD_CHUNK_MIN_ROWS`] rows
/// where a row is larger than a 256th of it (a vocabulary over 64k tokens).
const HEAD_CHUNK_BYTES: usize = 64 << 20;

/// Fewest rows of a chunk of [`head_chunks`]: its products keep the row count at which the f32
/// and bf16 products run at speed ([`SGEMM_MIN_ROWS`], `BF16_MIN_ROWS`).
const HEAD_CHUNK_MIN_ROWS: usize = 256;

/// Rows of each chunk of [`head_chunks`] for `n` rows over a vocabulary of `vocab`.
pub fn head_chunk_rows(n: usize, vocab: usize) -> usize {
    (HEAD_CHUNK_BYTES / (4 * vocab.max(1)))
        .max(HEAD_CHUNK_MIN_ROWS)
        .min(n.max(1))
}

/// What one pass of [`head_chunks`] returns: each row's log-probability of its target and
/// log-sum-exp (when it computed them), its entropy (when asked for), and the gradients of the
/// hidden states and the head (when asked for).
pub struct HeadPass {
    pub lp: Vec<f32>,
    pub lse: Vec<f32>,
    pub ent: Vec<f32>,
    pub dh: Option<FlexTensor>,
    pub dw: Option<FlexTensor>,
}

/// The entropy of each row's distribution in a pass of [`head_chunks`].
#[derive(Clone, Copy)]
pub enum Entropy<'a> {
    /// Not computed.
    Off,
    /// Computed in the forward pass ([`HeadPass::ent`]).
    Measure,
    /// In the backward pass: each row's entropy from the forward pass and its gradient, whose
    /// term joins the logits' gradient.
    Grad { ent: &'a [f32], grad: &'a [f32] },
}

/// The forward pass of [`head_chunks`] alone: each row's target log-probability `(N)`, or with
/// `entropy` `(N, 2)` (the log-probability, then the entropy of the row's distribution), and
/// each row's log-sum-exp `(N)`, as tensors.
pub fn head_logprobs(
    h: &FlexTensor,
    w: &FlexTensor,
    targets: &FlexTensor,
    bf16: bool,
    rows: usize,
    entropy: bool,
) -> (FlexTensor, FlexTensor) {
    let ent = if entropy {
        Entropy::Measure
    } else {
        Entropy::Off
    };
    let none = (false, false);
    let pass = head_chunks(h, w, targets, bf16, rows, None, None, none, ent);
    let n = pass.lp.len();
    let out = if entropy {
        let both = pass.lp.iter().zip(&pass.ent).flat_map(|(&lp, &e)| [lp, e]);
        tensor(both.collect(), vec![n, 2])
    } else {
        tensor(pass.lp, vec![n])
    };
    (out, tensor(pass.lse, vec![n]))
}

/// The language-model head `w (d, V)` (any strides: a tied head is the embedding's transposed
/// view) at hidden states `h (N, d)` and log softmax over the vocabulary, chunk by chunk of
/// `rows` rows ([`head_chunk_rows`]), each chunk's logits dropped before the next, so the
/// `(N, V)` logits are never held whole. Written by hand because no crate has it (Liger's fused
/// linear cross-entropy does it in Triton): the logits of a 32k-token vocabulary at 8,192 tokens
/// are 1 GiB of f32, and their gradient as much again.
///
/// Each chunk computes its logits and then:
/// - with `lse` `None`, each row's log-sum-exp and target log-probability (and its entropy with
///   [`Entropy::Measure`]);
/// - with `grad` (`g_i` per row), the logits' gradient g_i (onehot(target_i) - softmax) in
///   place (from `lse`, or from the log-sum-exp just computed), plus the entropy's with
///   [`Entropy::Grad`], then `dh = dlogits wᵀ` for its rows when `need.0` and
///   `dw += hᵀ dlogits` when `need.1`.
///
/// So one call is the forward pass (no `grad`), the backward pass of it (`grad` the output's
/// gradient, `lse` saved: each chunk's logits recomputed, one more product the size of the
/// head's forward pass), or both at once for a loss whose per-row gradient is known before the
/// pass (a mean cross-entropy: `grad` the coefficients, no `lse`), which costs no product more
/// than the whole logits do.
#[allow(clippy::too_many_arguments)]
pub fn head_chunks(
    h: &FlexTensor,
    w: &FlexTensor,
    targets: &FlexTensor,
    bf16: bool,
    rows: usize,
    lse: Option<&FlexTensor>,
    grad: Option<&FlexTensor>,
    need: (bool, bool),
    entropy: Entropy,
) -> HeadPass {
    let [n, d] = <[usize; 2]>::try_from(h.layout().shape().to_vec()).expect("hidden is (N, d)");
    let [dw_rows, vocab] =
        <[usize; 2]>::try_from(w.layout().shape().to_vec()).expect("head is (d, V)");
    assert_eq!(
        d, dw_rows,
        "head: hidden size {d} against a head of {dw_rows} rows"
    );
    let ids = target_ids(targets, n, vocab);
    let whole = contiguous(h.clone());
    let h = elems(&whole);
    let saved = lse.map(|l| contiguous(l.clone()));
    let g = grad.map(|g| contiguous(g.clone()));
    let g = g.as_ref().map(elems);
    let (mut lp, mut lse) = match &saved {
        Some(l) => (Vec::new(), elems(l).to_vec()),
        None => (vec![0f32; n], vec![0f32; n]),
    };
    let measure = saved.is_none() && matches!(entropy, Entropy::Measure);
    let mut ent = vec![0f32; if measure { n } else { 0 }];
    let (need_dh, need_dw) = if g.is_some() { need } else { (false, false) };
    // At bf16 over several chunks, the head is rounded and packed once for all of them, for the
    // logits (`h w`) and for the hidden states' gradient (`dlogits wᵀ`), where each chunk's
    // products would pack it again (a 32k-token head: 8 million values, 8 chunks at 4,096 rows).
    let packed = (bf16 && rows < n).then(|| {
        let (wm, _) = mat(w, false);
        let (wt, _) = mat(w, true);
        // SAFETY: both views are of `w`, (d, V) and (V, d), which lives through the loop.
        unsafe {
            (
                bf16::pack_b_all(wm, d, vocab),
                need_dh.then(|| bf16::pack_b_all(wt, vocab, d)),
            )
        }
    });
    let mut dh: Vec<f32> = Vec::with_capacity(if need_dh { n * d } else { 0 });
    // The first chunk's product is the head's gradient; the others add into it.
    let mut dw: Option<FlexTensor> = None;
    for r0 in (0..n).step_by(rows.max(1)) {
        let r1 = (r0 + rows).min(n);
        // One chunk of every row (a vocabulary of a few thousand tokens): the rows as they are.
        let hc = if r1 - r0 == n {
            whole.clone()
        } else {
            tensor(h[r0 * d..r1 * d].to_vec(), vec![r1 - r0, d])
        };
        let mut logits = match &packed {
            Some((pw, _)) => matmul_packed(&hc, pw),
            None => matmul(&hc, false, w, false, bf16),
        };
        if saved.is_none() {
            let (lp, lse) = (&mut lp[r0..r1], &mut lse[r0..r1]);
            if measure {
                let out = (lp, lse, &mut ent[r0..r1]);
                logprob_entropy_rows(elems(&logits), vocab, &ids[r0..r1], out);
            } else {
                logprob_rows(elems(&logits), vocab, &ids[r0..r1], lp, lse);
            }
        }
        let Some(g) = g else { continue };
        let ent_grad = match entropy {
            Entropy::Grad { ent, grad } => Some((&ent[r0..r1], &grad[r0..r1])),
            _ => None,
        };
        logprob_grad_rows(
            &mut logits.storage_mut::<f32>()[..(r1 - r0) * vocab],
            vocab,
            &ids[r0..r1],
            &lse[r0..r1],
            &g[r0..r1],
            ent_grad,
        );
        if need_dh {
            let part = match &packed {
                Some((_, Some(pt))) => matmul_packed(&logits, pt),
                _ => matmul(&logits, false, w, true, bf16),
            };
            dh.extend_from_slice(elems(&part));
        }
        if need_dw {
            match dw.as_mut() {
                None => dw = Some(matmul(&hc, true, &logits, false, bf16)),
                Some(acc) => {
                    let acc = &mut acc.storage_mut::<f32>()[..d * vocab];
                    matmul_add(acc, &hc, true, &logits, false, bf16)
                }
            }
        }
    }
    if need_dw && dw.is_none() {
        // No rows: a head that trains still gets its (zero) gradient.
        dw = Some(tensor(vec![0f32; d * vocab], vec![d, vocab]));
    }
    HeadPass {
        lp,
        lse,
        ent,
        dh: need_dh.then(|| tensor(dh, vec![n, d])),
        dw,
    }
}

/// Σ_i coef_i · x_i as a `(1)` tensor, summed in f64.
pub fn weighted_sum(x: &[f32], coef: &FlexTensor) -> FlexTensor {
    let c = contiguous(coef.clone());
    let c = elems(&c);
    assert_eq!(c.len(), x.len(), "one coefficient per row");
    let s: f64 = x.iter().zip(c).map(|(x, c)| *x as f64 * *c as f64).sum();
    tensor(vec![s as f32], vec![1])
}

/// The one value of a `(1)` tensor.
pub fn scalar(x: &FlexTensor) -> f32 {
    elems(&contiguous(x.clone()))[0]
}

/// `x · s`, in place where nothing else holds `x`.
pub fn scaled(x: FlexTensor, s: f32) -> FlexTensor {
    if s == 1.0 {
        return x;
    }
    let mut x = contiguous(x);
    let n = x.layout().shape().iter().product::<usize>();
    for_chunks(&mut x.storage_mut::<f32>()[..n], BLOCK, |_, c| {
        simd::scale(c, s)
    });
    x
}

/// The entropy of softmax(row) of one row of logits: H = log z + m - Σ p x, with m the row's
/// largest logit, z = Σ exp(x - m) and p = exp(x - m) / z.
fn entropy_row(row: &[f32]) -> f32 {
    let m = simd::max(row);
    let (z, ex) = simd::sum_exp_shift_dot(row, m);
    z.ln() + m - ex / z
}

/// The entropy of softmax over each row of `logits (N, V)`, `(N)`; the rows in parallel, read
/// in place (a measurement: no gradient).
pub fn entropy(logits: &FlexTensor) -> FlexTensor {
    let shape = logits.layout().shape().to_vec();
    let [n, vocab] = <[usize; 2]>::try_from(shape).expect("logits are (N, V)");
    let x = contiguous(logits.clone());
    let x = elems(&x);
    let mut h = vec![0f32; n];
    h.par_iter_mut()
        .enumerate()
        .for_each(|(i, h)| *h = entropy_row(&x[i * vocab..(i + 1) * vocab]));
    tensor(h, vec![n])
}

/// The gradient of [`token_logprobs`] with respect to the logits: g_i (onehot(target_i) -
/// softmax(logits_i)). Writes into the logits' buffer when nothing else holds it.
pub fn token_logprobs_backward(
    logits: FlexTensor,
    targets: &FlexTensor,
    lse: &FlexTensor,
    grad: &FlexTensor,
) -> FlexTensor {
    let shape = logits.layout().shape().to_vec();
    let [n, vocab] = <[usize; 2]>::try_from(shape.clone()).unwrap();
    let ids = ids(targets);
    let lse = contiguous(lse.clone());
    let g = contiguous(grad.clone());
    let (lse, g) = (elems(&lse), elems(&g));
    let mut x = contiguous(logits);
    logprob_grad_rows(
        &mut x.storage_mut::<f32>()[..n * vocab],
        vocab,
        &ids,
        lse,
        g,
        None,
    );
    x
}

/// Row blocks for the element-wise kernels: big enough to amortize a task. A kernel whose whole
/// input fits in one block runs on the calling thread: handing work to rayon's pool and waiting
/// for it costs more than the arithmetic (measured: batch-16 decoding lost 5-10%).
const BLOCK: usize = 16 * 1024;

/// The most elements the element-wise kernels that decoding runs ([`silu_mul`], [`rms_norm`],
/// the rotary embedding, the adds of [`for_chunks`]) take on the calling thread. Decoding a
/// batch of 64 (a PPO rollout) gives SwiGLU 64 x 688 elements: above one [`BLOCK`], each call
/// woke rayon's idle worker, which then spun beside `team`'s helper on the other core (128 times
/// a rollout). Measured on a 2-core Zen 4 (`crates/engine/examples/rollout.rs`, 12 runs of
/// each, four alternating pairs): context switches 19,000-45,000 -> 960-1,700 a run, the
/// rollout's median 1-5% shorter (216 -> 206 ms). Most training passes stay far above it (a
/// PPO minibatch's SwiGLU: 572,000 elements); the bits are the same either way.
const SERIAL_MAX: usize = 8 * BLOCK;

/// A kernel's output of `n` f32, every element written by `fill` (which hands the slice, piece
/// by piece, to row primitives that write all of their output and assert it), so never zeroed
/// first: zeroing each fresh output (`vec![0; n]`) measured 6-14% of a training step.
fn written(n: usize, fill: impl FnOnce(&mut [simd::Out])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all n elements (see above).
    unsafe { v.set_len(n) };
    v
}

/// A buffer for `n` f32 that products will write whole through raw pointers; the caller sets its
/// length to `n` once they have. With `zero` (something adds into it, or a product is empty and
/// would write nothing) it is zeroed instead, already `n` long.
fn product_out(n: usize, zero: bool) -> Vec<f32> {
    if zero {
        vec![0f32; n]
    } else {
        Vec::with_capacity(n)
    }
}

/// `f(i, chunk)` over `chunk`-sized pieces of `data`, in parallel unless `data` is at most
/// [`SERIAL_MAX`] long.
fn for_chunks<T, F>(data: &mut [T], chunk: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Send + Sync,
{
    for_chunks_serial_upto(data, chunk, SERIAL_MAX, f)
}

/// [`for_chunks`], on the calling thread where `data` is at most `serial_max` long.
fn for_chunks_serial_upto<T, F>(data: &mut [T], chunk: usize, serial_max: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Send + Sync,
{
    if data.len() <= serial_max {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// silu(gate) * up, element-wise; any shape, both the same.
pub fn silu_mul(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    let shape = gate.layout().shape().to_vec();
    assert_eq!(shape, up.layout().shape().to_vec(), "gate and up shapes");
    let (g, u) = (contiguous(gate.clone()), contiguous(up.clone()));
    let (g, u) = (elems(&g), elems(&u));
    assert_eq!(g.len(), u.len(), "gate and up sizes");
    let out = written(g.len(), |out| {
        for_chunks(out, BLOCK, |i, o| {
            let r = i * BLOCK..i * BLOCK + o.len();
            simd::silu_mul(&g[r.clone()], &u[r], o)
        })
    });
    tensor(out, shape)
}

/// Gradients of [`silu_mul`] with respect to gate and up.
pub fn silu_mul_backward(
    gate: &FlexTensor,
    up: &FlexTensor,
    dy: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let shape = gate.layout().shape().to_vec();
    let (g, u, d) = (
        contiguous(gate.clone()),
        contiguous(up.clone()),
        contiguous(dy.clone()),
    );
    let (g, u, d) = (elems(&g), elems(&u), elems(&d));
    let n = g.len();
    assert!(u.len() == n && d.len() == n, "SwiGLU backward sizes");
    let mut du: Vec<f32> = Vec::with_capacity(n);
    let dg = written(n, |dg| {
        dg.par_chunks_mut(BLOCK)
            .zip(du.spare_capacity_mut()[..n].par_chunks_mut(BLOCK))
            .zip(
                d.par_chunks(BLOCK)
                    .zip(g.par_chunks(BLOCK).zip(u.par_chunks(BLOCK))),
            )
            .for_each(|((dg, du), (d, (g, u)))| simd::silu_mul_grad(d, g, u, dg, du))
    });
    // SAFETY: silu_mul_grad wrote every element of du beside dg's (equal chunks).
    unsafe { du.set_len(n) };
    (tensor(dg, shape.clone()), tensor(du, shape))
}

/// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) * w. Returns the output and each
/// row's 1 / rms `(rows)` (what the backward pass needs).
pub fn rms_norm(x: &FlexTensor, w: &FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
    let shape = x.layout().shape().to_vec();
    let d = *shape.last().expect("RMSNorm input has a last dimension");
    let (xc, wc) = (contiguous(x.clone()), contiguous(w.clone()));
    let (xs, ws) = (elems(&xc), elems(&wc));
    assert_eq!(
        ws.len(),
        d,
        "RMSNorm weight has {} entries for rows of {d}",
        ws.len()
    );
    let rows = xs.len() / d;
    let mut inv = vec![0f32; rows];
    let per = (BLOCK / d).max(1);
    let block = |((o, iv), x): ((&mut [simd::Out], &mut [f32]), &[f32])| {
        for ((o, iv), x) in o.chunks_exact_mut(d).zip(iv).zip(x.chunks_exact(d)) {
            *iv = 1.0 / (simd::dot(x, x) / d as f32 + eps).sqrt();
            simd::norm_row(o, x, ws, *iv);
        }
    };
    // Every row of the output is normalized (xs is whole rows of d).
    let out = written(rows * d, |out| {
        if xs.len() <= SERIAL_MAX {
            block(((out, &mut inv), xs));
        } else {
            out.par_chunks_mut(per * d)
                .zip(inv.par_chunks_mut(per))
                .zip(xs.par_chunks(per * d))
                .for_each(block);
        }
    });
    (tensor(out, shape), tensor(inv, vec![rows]))
}

/// Gradients of [`rms_norm`] with respect to x and w.
pub fn rms_norm_backward(
    x: &FlexTensor,
    w: &FlexTensor,
    inv: &FlexTensor,
    dy: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let shape = x.layout().shape().to_vec();
    let d = *shape.last().unwrap();
    let (xc, wc, ic, dc) = (
        contiguous(x.clone()),
        contiguous(w.clone()),
        contiguous(inv.clone()),
        contiguous(dy.clone()),
    );
    let (xs, ws, is, ds) = (elems(&xc), elems(&wc), elems(&ic), elems(&dc));
    let rows = xs.len() / d;
    assert!(
        ds.len() == xs.len() && is.len() == rows,
        "RMSNorm backward sizes"
    );
    let per = (BLOCK / d).max(1);
    // Each block of rows sums its own dw; the partial sums are then added in block order on one
    // thread. (rayon's `reduce` would pair them in an order that depends on work stealing, so
    // the same run could end in different bits: a resumed run must equal an uninterrupted one.)
    let mut partials: Vec<Vec<f32>> = vec![];
    let dx = written(rows * d, |dx| {
        partials = dx
            .par_chunks_mut(per * d)
            .zip(xs.par_chunks(per * d))
            .zip(ds.par_chunks(per * d))
            .zip(is.par_chunks(per))
            .map(|(((dx, x), dy), iv)| {
                let mut dw = vec![0f32; d];
                for (((dx, x), dy), &iv) in dx
                    .chunks_exact_mut(d)
                    .zip(x.chunks_exact(d))
                    .zip(dy.chunks_exact(d))
                    .zip(iv)
                {
                    let c = iv * iv * iv * simd::dot3(dy, ws, x) / d as f32;
                    simd::norm_row_grad(dx, &mut dw, dy, x, ws, iv, c);
                }
                dw
            })
            .collect();
    });
    let mut dw = vec![0f32; d];
    for part in &partials {
        simd::axpy(&mut dw, 1.0, part);
    }
    (tensor(dx, shape), tensor(dw, vec![d]))
}

/// Rotary embedding of `x (B, H, T, hd)` (any strides) with `cos, sin (B, 1, T, hd)`; the result
/// is stored `(B, T, H, hd)`. `transpose` applies the adjoint rotation (the backward pass).
pub fn rope(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, transpose: bool) -> FlexTensor {
    let xv = View::new(x);
    let [b, h, t, hd] =
        <[usize; 4]>::try_from(xv.dims.clone()).expect("rope input is (B, H, T, hd)");
    let (cc, sc) = (contiguous(cos.clone()), contiguous(sin.clone()));
    let (cs, ss) = (elems(&cc), elems(&sc));
    let cb = cos.layout().shape()[0];
    assert!(
        (cb == b || cb == 1) && cs.len() == cb * t * hd && ss.len() == cs.len(),
        "rope tables {:?} for input {:?}",
        cos.layout().shape(),
        xv.dims
    );
    let contiguous_rows = xv.strides[3] == 1;
    // Every (b, t) row of heads is written, each head's hd values by rope_row.
    let out = written(b * t * h * hd, |out| {
        for_chunks(out, h * hd, |bt, o| {
            let (bi, ti) = (bt / t, bt % t);
            let row = ((if cb == 1 { 0 } else { bi }) * t + ti) * hd;
            let (c, s) = (&cs[row..row + hd], &ss[row..row + hd]);
            let mut tmp = vec![0f32; if contiguous_rows { 0 } else { hd }];
            for (hi, o) in o.chunks_exact_mut(hd).enumerate() {
                let p = xv.ptr(&[bi, hi, ti]);
                let xr: &[f32] = if contiguous_rows {
                    unsafe { std::slice::from_raw_parts(p, hd) }
                } else {
                    for (j, v) in tmp.iter_mut().enumerate() {
                        *v = unsafe { *p.offset(j as isize * xv.strides[3]) };
                    }
                    &tmp
                };
                simd::rope_row(o, xr, c, s, transpose);
            }
        })
    });
    heads_last(out, [b, h, t, hd])
}

/// One AdamW step over a parameter (see [`simd::adamw`]); returns the new parameter and moments.
/// Updates in place the buffers nothing else holds.
pub fn adamw(
    x: FlexTensor,
    m: FlexTensor,
    v: FlexTensor,
    g: &FlexTensor,
    step: simd::AdamWStep,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (mut x, mut m, mut v) = (contiguous(x), contiguous(m), contiguous(v));
    let g = contiguous(g.clone());
    let gs = elems(&g);
    let n = gs.len();
    {
        let xs = &mut x.storage_mut::<f32>()[..n];
        let ms = &mut m.storage_mut::<f32>()[..n];
        let vs = &mut v.storage_mut::<f32>()[..n];
        if n <= BLOCK {
            simd::adamw(xs, ms, vs, gs, step);
        } else {
            xs.par_chunks_mut(BLOCK)
                .zip(ms.par_chunks_mut(BLOCK))
                .zip(vs.par_chunks_mut(BLOCK))
                .zip(gs.par_chunks(BLOCK))
                .for_each(|(((x, m), v), g)| simd::adamw(x, m, v, g, step));
        }
    }
    (x, m, v)
}

/// The sum of the squares of a tensor's elements, `(1)`: blocks in parallel, each block's sum in
/// f32 lanes ([`simd::dot`] of the block with itself) and the blocks' sums in f64. Read in
/// place, one pass: what gradient clipping needs of each gradient.
pub fn sum_squares(x: &FlexTensor) -> FlexTensor {
    let x = contiguous(x.clone());
    let xs = elems(&x);
    let total: f64 = if xs.len() <= BLOCK {
        simd::dot(xs, xs) as f64
    } else {
        xs.par_chunks(BLOCK).map(|c| simd::dot(c, c) as f64).sum()
    };
    tensor(vec![total as f32], vec![1])
}

/// A 2-D f32 tensor as a [`bf16::Mat`], transposed when `t`, with its `(rows, cols)`.
fn mat(x: &FlexTensor, t: bool) -> (bf16::Mat, [usize; 2]) {
    let v = View::new(x);
    let [r, c] = <[usize; 2]>::try_from(v.dims.clone()).expect("a matrix");
    let m = bf16::Mat {
        ptr: v.ptr(&[]),
        rs: v.strides[0],
        cs: v.strides[1],
    };
    if t {
        (m.t(), [c, r])
    } else {
        (m, [r, c])
    }
}

/// `C = A B` with the `gemm` crate, C row-major `m x n` at `out` with row stride `c_rs`, written
/// without being read: the f32 product where [`super::sgemm`] does not run (and what its test
/// and `examples/sgemm_shapes.rs` compare it with).
///
/// # Safety
/// `a` and `b` must be valid for `m x k` and `k x n`, and `out` for the `m x n` writes.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    c_rs: isize,
    a: bf16::Mat,
    b: bf16::Mat,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m, n, k, out, 1, c_rs, false, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 0.0, 1.0, false, false,
        false, par,
    );
}

/// From this many rows of A, an f32 product copies a B whose columns are not contiguous (the
/// backward pass's `dy · wᵀ`, `wᵀ` a transposed view of the weight) into rows first.
///
/// `gemm` packs that B (its left operand once it has transposed the product to write C by
/// columns) by gathering one value at a time, at every block of the product and on every
/// thread; a blocked transpose into a contiguous copy costs one pass, and packing rows is a
/// copy. Measured on a Zen 4 (`examples/dx_products.rs`, GFLOP/s of the product from the view,
/// before and after, the copy included): 832 rows (a PPO minibatch) 143 → 206-212 at 256 x 256,
/// 183 → 202-206 at 768 x 256, 143 → 183-190 for the head's 4096 x 256; at 4096 rows (a `tiny`
/// training step) within noise. A B made contiguous beforehand ran at 195-228 throughout. (Where
/// [`super::sgemm`] runs the products instead, it packs such a B itself.)
const ROWS_B_MIN_M: usize = 64;

/// `b` (`k x n`, any strides) copied row-major.
fn rows_of(b: bf16::Mat, k: usize, n: usize) -> Vec<f32> {
    let src = Ptr(b.ptr as *mut f32);
    // Rows of the copy in one task: a large B (the head's) is copied on every thread.
    let per_task = (BLOCK / n).max(16);
    // Training's copies (on CPUs without `sgemm`) keep the one-block threshold: [`SERIAL_MAX`]
    // was measured on decoding's kernels only.
    written(k * n, |rows| {
        for_chunks_serial_upto(rows, per_task * n, BLOCK, |c, out| {
            let len = out.len() / n;
            // SAFETY: `b` is a live view of `k x n` values; this task's rows start at
            // `c * per_task`, and `transpose` of the `n x len` matrix there (bᵀ's columns,
            // strides swapped) writes the whole `len x n` block.
            unsafe {
                let from = (src.at(0) as *const f32).offset((c * per_task) as isize * b.rs);
                small::transpose(from, n, len, b.cs, b.rs, out);
            }
        })
    })
}

/// From this many rows of A an f32 product runs on [`super::sgemm`] where it is available. Fewer
/// stay on `gemm`: `sgemm` packs the whole of B for them, and ran 64 x 256 x 688 at 0.71-0.94x of
/// `gemm`'s speed (`examples/sgemm_shapes.rs`). (Decoding's rows, up to 64, take
/// [`skinny`] from a packed copy of the weight kept between steps.)
const SGEMM_MIN_ROWS: usize = 128;

/// Whether f32 products run on [`super::sgemm`] (AVX-512) rather than `gemm`.
fn sgemm_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::sgemm::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `c += op(a) · op(b)` for a row-major `c` of the product's shape: added in the product where
/// its kernel can ([`super::sgemm`], bf16), else the product and then one pass that adds it.
pub fn matmul_add(c: &mut [f32], a: &FlexTensor, ta: bool, b: &FlexTensor, tb: bool, bf16: bool) {
    let (am, [m, k]) = mat(a, ta);
    let (bm, [kb, n]) = mat(b, tb);
    assert_eq!(k, kb, "matmul: ({m}, {k}) x ({kb}, {n})");
    assert_eq!(
        c.len(),
        m * n,
        "matmul_add: C of {} for ({m}, {n})",
        c.len()
    );
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: both views come from live tensors of these shapes; `c` is m x n, row-major.
    unsafe {
        if bf16 {
            let kernel = bf16::Kernel::Best;
            return bf16::gemm(m, n, k, c.as_mut_ptr(), n as isize, true, am, bm, kernel);
        }
        #[cfg(target_arch = "x86_64")]
        if m >= SGEMM_MIN_ROWS && sgemm_available() {
            return super::sgemm::gemm_acc(m, n, k, c.as_mut_ptr(), n as isize, am, bm, true);
        }
    }
    let part = matmul(a, ta, b, tb, false);
    let part = elems(&part);
    for_chunks(c, BLOCK, |i, out| {
        simd::add(out, &part[i * BLOCK..i * BLOCK + out.len()])
    });
}

/// `op(a) · op(b)` (`op` transposes when its flag is set) in f32 with [`super::sgemm`] where it
/// is [`super::sgemm::available`] (`gemm` elsewhere), or with `bf16`,
/// bf16 inputs and f32 sums; `a` and `b` are 2-D with any strides. The output is written, never
/// zeroed first.
pub fn matmul(a: &FlexTensor, ta: bool, b: &FlexTensor, tb: bool, bf16: bool) -> FlexTensor {
    let (am, [m, k]) = mat(a, ta);
    let (bm, [kb, n]) = mat(b, tb);
    assert_eq!(k, kb, "matmul: ({m}, {k}) x ({kb}, {n})");
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: both views come from live tensors of these shapes; `out` has room for m x n,
    // row-major, and the product (acc = false, read_dst = false) writes every element of it
    // before it is read.
    unsafe {
        if bf16 {
            bf16::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                n as isize,
                false,
                am,
                bm,
                bf16::Kernel::Best,
            );
        } else if k == 0 {
            // An empty sum (not left to `gemm`, so that no element stays unwritten).
            out.resize(m * n, 0.0);
        } else if m >= SGEMM_MIN_ROWS && n > 0 && sgemm_available() {
            #[cfg(target_arch = "x86_64")]
            super::sgemm::gemm(m, n, k, out.as_mut_ptr(), n as isize, am, bm);
        } else if m > 0 && n > 0 {
            // burn's threshold for running `gemm` on every core (192³ multiply-adds).
            let par = if m * n * k >= 192 * 192 * 192 {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            };
            let rows_b;
            let bm = if bm.cs != 1 && m >= ROWS_B_MIN_M && n > 1 {
                rows_b = rows_of(bm, k, n);
                bf16::Mat {
                    ptr: rows_b.as_ptr(),
                    rs: n as isize,
                    cs: 1,
                }
            } else {
                bm
            };
            gemm_into(m, n, k, out.as_mut_ptr(), n as isize, am, bm, par);
        }
        out.set_len(m * n);
    }
    tensor(out, vec![m, n])
}

/// `a (M, K) · b` at bf16 with `b (K, N)` packed beforehand ([`bf16::pack_b_all`]): what
/// [`matmul`] computes at bf16, bit for bit.
fn matmul_packed(a: &FlexTensor, b: &bf16::PackedB) -> FlexTensor {
    let (am, [m, k]) = mat(a, false);
    let n = b.cols();
    assert_eq!(k, b.rows(), "matmul: ({m}, {k}) x ({}, {n})", b.rows());
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `a` is a live (m, k) view; `out` has room for m x n, row-major, and the product
    // (acc = false) writes every element of it.
    unsafe {
        bf16::gemm_packed(
            m,
            out.as_mut_ptr(),
            n as isize,
            false,
            am,
            b,
            bf16::Kernel::Best,
        );
        out.set_len(m * n);
    }
    tensor(out, vec![m, n])
}

/// Most bytes of weights [`packed_weight`] keeps packed at once; past it, weights are read in
/// place (a copy of a large model's weights is not worth its memory).
const PACKED_BUDGET: usize = 1 << 30;

/// A packed weight and what it was packed from: the tensor's buffer, held weakly (the weight's
/// memory is not kept alive by the cache, and no other buffer can take its place while the
/// entry lives), where the matrix starts in it, its row stride, its shape and whether it was
/// packed as bf16.
struct PackedEntry {
    data: std::sync::Weak<burn::tensor::Bytes>,
    key: (usize, usize, usize, usize, bool),
    packed: std::sync::Arc<skinny::Packed>,
}

/// The weights decoding steps multiply by, [`skinny::pack`]ed once and kept while the weight
/// tensors live. A decoding loop calls the same weights for every token. A weight that changes
/// (an optimizer step) no longer matches its entry: burn writes through `Arc::make_mut`, which
/// copies a shared buffer and, for an unshared one, moves it to a new allocation and cuts off
/// the weak references. An entry whose weight is gone is dropped at the next call.
static PACKED: std::sync::Mutex<Vec<PackedEntry>> = std::sync::Mutex::new(Vec::new());

/// The packed copy of `b` (viewed as `bm`, `k x n`; as bf16 when `as_bf16`), packed now if
/// there is none; `None` when the budget is spent.
fn packed_weight(
    b: &FlexTensor,
    bm: bf16::Mat,
    k: usize,
    n: usize,
    as_bf16: bool,
) -> Option<std::sync::Arc<skinny::Packed>> {
    let data = b.data_arc();
    let key = (bm.ptr as usize, bm.rs as usize, k, n, as_bf16);
    let mut cache = PACKED.lock().unwrap_or_else(|e| e.into_inner());
    cache.retain(|e| e.data.strong_count() > 0);
    if let Some(e) = cache
        .iter()
        .find(|e| std::ptr::eq(e.data.as_ptr(), std::sync::Arc::as_ptr(&data)) && e.key == key)
    {
        return Some(e.packed.clone());
    }
    let held: usize = cache.iter().map(|e| e.packed.bytes()).sum();
    if held + k * n * if as_bf16 { 2 } else { 4 } > PACKED_BUDGET {
        return None;
    }
    // Packed outside the lock (packing runs on rayon's pool, whose threads may come back here).
    drop(cache);
    // SAFETY: `bm` is a live view of `b`, `k x n` with row stride `bm.rs` and contiguous columns.
    let packed = std::sync::Arc::new(unsafe {
        if as_bf16 {
            skinny::pack_bf16(k, n, bm.ptr, bm.rs as usize)
        } else {
            skinny::pack(k, n, bm.ptr, bm.rs as usize)
        }
    });
    let mut cache = PACKED.lock().unwrap_or_else(|e| e.into_inner());
    cache.push(PackedEntry {
        data: std::sync::Arc::downgrade(&data),
        key,
        packed: packed.clone(),
    });
    Some(packed)
}

/// `a (M, K) · b (K, N)` in f32 for a few rows (decoding): [`skinny::matmul_packed`] where `b`'s
/// rows are contiguous (a linear layer's weight), from a packed copy kept between calls
/// ([`packed_weight`]), or read in place past the packing budget; `gemm` on every core otherwise
/// (a tied head's transposed embedding).
///
/// At the `bf16` precision ([`super::bf16_decoding`]) the packed copy is bf16: the f32 product with
/// the weight rounded to bf16, streaming half the bytes. The activations stay f32, unlike in the
/// training products, which round them too: decoding waits on reading the weights, not on the
/// arithmetic, so rounding them would gain nothing.
pub fn matmul_rows(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (am, [m, k]) = mat(a, false);
    let (bm, [kb, n]) = mat(b, false);
    assert_eq!(k, kb, "matmul: ({m}, {k}) x ({kb}, {n})");
    if skinny::available() && am.cs == 1 && bm.cs == 1 && am.rs >= 0 && bm.rs >= 0 {
        // SAFETY: both views come from live tensors of these shapes and strides.
        let out = unsafe {
            match packed_weight(b, bm, k, n, super::bf16_decoding()) {
                Some(p) => skinny::matmul_packed(m, am.ptr, am.rs as usize, &p),
                None => skinny::matmul(m, k, n, am.ptr, am.rs as usize, bm.ptr, bm.rs as usize),
            }
        };
        return tensor(out, vec![m, n]);
    }
    let mut out = vec![0f32; m * n];
    // SAFETY: as above; `out` is row-major m x n.
    unsafe {
        gemm_into(
            m,
            n,
            k,
            out.as_mut_ptr(),
            n as isize,
            am,
            bm,
            gemm::Parallelism::Rayon(0),
        )
    };
    tensor(out, vec![m, n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::MASKED;

    /// The tiles of a `(1, 1, T, S)` mask given as rows of open (true) keys.
    fn tiles_of(rows: &[Vec<bool>]) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
        let (t, s) = (rows.len(), rows[0].len());
        let m: Vec<f32> = rows
            .iter()
            .flatten()
            .map(|&open| if open { 0.0 } else { MASKED })
            .collect();
        let mask = tensor(m, vec![1, 1, t, s]);
        let mut tiles = mask_tiles(&View::new(&mask), t, s);
        assert_eq!(tiles.len(), 1);
        tiles
            .remove(0)
            .into_iter()
            .map(|tile| (tile.rows, tile.keys))
            .collect()
    }

    #[test]
    fn causal_tiles_follow_the_diagonal() {
        let causal: Vec<Vec<bool>> = (0..70).map(|i| (0..70).map(|j| j <= i).collect()).collect();
        assert_eq!(
            tiles_of(&causal),
            vec![(0..32, 0..32), (32..64, 0..64), (64..70, 0..70)]
        );
    }

    #[test]
    fn packed_segments_get_tiles_of_their_own() {
        // Segments of 40 and 10 tokens, then 3 unused slots that see only themselves.
        let seg = [(0, 40), (40, 50), (50, 51), (51, 52), (52, 53)];
        let rows: Vec<Vec<bool>> = (0..53)
            .map(|i| {
                let &(a, _) = seg.iter().find(|(a, b)| (*a..*b).contains(&i)).unwrap();
                (0..53).map(|j| j >= a && j <= i).collect()
            })
            .collect();
        assert_eq!(
            tiles_of(&rows),
            vec![
                (0..32, 0..32),
                (32..40, 0..40),
                (40..50, 40..50),
                (50..51, 50..51),
                (51..52, 51..52),
                (52..53, 52..53),
            ]
        );
    }

    #[test]
    fn open_and_fully_closed_rows_read_every_key_in_one_tile() {
        // Rows with nothing masked, and left-padding rows with every key closed (they attend
        // uniformly, as the dense softmax makes them): one dense tile.
        assert_eq!(tiles_of(&vec![vec![true; 9]; 40]), vec![(0..40, 0..9)]);
        assert_eq!(tiles_of(&vec![vec![false; 9]; 40]), vec![(0..40, 0..9)]);
        // A closed key inside a row's open span is inside the tile (its probability is 0 there
        // as in the dense product).
        let mut holes = vec![vec![true; 9]; 5];
        holes[2][4] = false;
        assert_eq!(tiles_of(&holes), vec![(0..5, 0..9)]);
    }
}
