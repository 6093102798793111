//! Vectorized row primitives for the fused CPU kernels: exp, max, sum, dot.
//!
//! Written by hand because burn's `flex` backend computes `exp` one scalar `expf` call at a time
//! (measured: 8-11% of a training step, plus libm's slow path for the -1e9 entries of an attention
//! mask). The loops below are plain Rust that LLVM vectorizes; [`dispatch`] compiles each one a
//! second time with AVX-512 enabled and picks that copy at run time when the CPU has it, so the
//! binary stays portable.
//!
//! Reductions keep 16 partial accumulators so LLVM can vectorize them without reassociating
//! floating-point sums it is not allowed to reorder.

const LANES: usize = 16;

/// An output element that a primitive writes without reading: the kernels hand out their
/// fresh, never-zeroed output buffers as slices of these (see `kernels::written`).
pub type Out = std::mem::MaybeUninit<f32>;

/// exp(x) to about 2 ulp (Cephes' `expf`: x = n ln 2 + r, a degree-6 polynomial in r, scaled by
/// 2^n through the exponent bits). Returns exactly 0 below -87.3 (where f32's exp leaves the normal
/// range), as a masked attention score `exp(-1e9)` must.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.376_26);
    let n = xc.mul_add(LOG2E, 0.5).floor();
    // Fused multiply-adds: each a single instruction in the copies [`dispatch`] compiles for
    // AVX2 and AVX-512 (and on aarch64), where the separate multiplies and adds made one chain
    // of 27 dependent operations per vector; a libm call on a pre-AVX2 x86 (the portable copy).
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    // 2^n through the exponent bits. n + 127 is a whole number in [0, 255], so adding 2^23 puts
    // it in the mantissa's low bits, and shifting left by 23 moves it to the exponent's place
    // (the magic's own exponent shifts out). The same bits as `(n as i32 + 127) << 23`, whose
    // saturating float-to-int conversion LLVM compiled to 16 scalar conversions per vector
    // (measured: half the time of the exp-heavy kernels).
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < -87.336_55 {
        0.0
    } else {
        e * scale
    }
}

/// The widest instruction set the row primitives have a copy for on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// x86-64 baseline (SSE2): 4 lanes, and `floor` is a libm call.
    Baseline,
    /// x86-64-v3: AVX2 and FMA, 8 lanes (Zen 1-3, Intel since Haswell).
    V3,
    /// AVX-512: 16 lanes (Zen 4-5, Intel server parts).
    V4,
}

/// The widest level this CPU supports, detected once.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            if has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") {
                Level::V4
            } else if has!("avx2") && has!("fma") && has!("sse4.1") {
                Level::V3
            } else {
                Level::Baseline
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Baseline
}

/// A cap on the level, `u8::MAX` for none: set by [`set_max_level`] (tests, `KILN_SIMD`).
static CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Caps the level the primitives run at (never above [`detected`]), to compare the copies side by
/// side; `None` lifts the cap. `KILN_SIMD=baseline|v3|v4` sets it for a whole process.
pub fn set_max_level(cap: Option<Level>) {
    CAP.store(
        cap.map_or(u8::MAX, |l| l as u8),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The level the primitives run at now: [`detected`], capped.
#[inline]
pub fn level() -> Level {
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| {
        let cap = match std::env::var("KILN_SIMD").as_deref() {
            Ok("baseline") => Some(Level::Baseline),
            Ok("v3") => Some(Level::V3),
            _ => None,
        };
        if cap.is_some() {
            set_max_level(cap);
        }
    });
    let cap = CAP.load(std::sync::atomic::Ordering::Relaxed);
    let d = detected();
    if (d as u8) <= cap {
        d
    } else if cap == Level::V3 as u8 {
        Level::V3
    } else {
        Level::Baseline
    }
}

/// Runs `$body` (an expression using the function's arguments) compiled three times: for the
/// baseline target, with AVX2 + FMA (x86-64-v3) and with AVX-512, choosing at run time. Rust
/// never contracts `a * b + c` into an FMA by itself, and the reductions keep a fixed order of
/// partial sums, so the three copies compute the same bits; only their speed differs (on an AVX2
/// CPU the baseline copy ran 4-lane SSE2 and called libm's `floorf` inside `exp`).
macro_rules! dispatch {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma,sse4.1")]
                unsafe fn v3($($arg: $ty),*) -> $ret { imp($($arg),*) }
                match $crate::fused::simd::level() {
                    // SAFETY: the CPU has the features each copy was compiled for.
                    $crate::fused::simd::Level::V4 => return unsafe { v4($($arg),*) },
                    $crate::fused::simd::Level::V3 => return unsafe { v3($($arg),*) },
                    $crate::fused::simd::Level::Baseline => {}
                }
            }
            imp($($arg),*)
        }
    };
}

dispatch! {
    /// The largest element (-inf for an empty row).
    pub fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let mut m = f32::NEG_INFINITY;
        for v in acc.iter().chain(rest) {
            m = if *v > m { *v } else { m };
        }
        m
    }
}

dispatch! {
    /// x[i] = exp(x[i] - shift) in place; returns the sum of the new values.
    pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let e = exp(c[i] - shift);
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut s = 0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v - shift);
            s += *v;
        }
        acc.iter().sum::<f32>() + s
    }
}

dispatch! {
    /// The sum of exp(x[i] - shift), leaving x unchanged.
    pub fn sum_exp_shift(x: &[f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp(c[i] - shift);
            }
        }
        acc.iter().sum::<f32>() + rest.iter().map(|v| exp(*v - shift)).sum::<f32>()
    }
}

dispatch! {
    /// The sums of e[i] = exp(x[i] - shift) and of e[i] x[i], leaving x unchanged: a softmax
    /// row's normalizer and expected logit in one pass (its entropy, without writing e).
    pub fn sum_exp_shift_dot(x: &[f32], shift: f32) -> (f32, f32) {
        let (mut acc, mut dot) = ([0f32; LANES], [0f32; LANES]);
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                let e = exp(c[i] - shift);
                acc[i] += e;
                dot[i] += e * c[i];
            }
        }
        let (mut s, mut d) = (acc.iter().sum::<f32>(), dot.iter().sum::<f32>());
        for v in rest {
            let e = exp(*v - shift);
            s += e;
            d += e * *v;
        }
        (s, d)
    }
}

dispatch! {
    /// x[i] *= s.
    pub fn scale(x: &mut [f32], s: f32) -> () {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

dispatch! {
    /// x[i] += a[i] (an attention score row plus its additive mask).
    pub fn add(x: &mut [f32], a: &[f32]) -> () {
        for (v, a) in x.iter_mut().zip(a) {
            *v += *a;
        }
    }
}

dispatch! {
    /// y[i] += a * x[i].
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) -> () {
        for (y, x) in y.iter_mut().zip(x) {
            *y += a * *x;
        }
    }
}

dispatch! {
    /// The dot product of two rows.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let ca = a.chunks_exact(LANES);
        let cb = b.chunks_exact(LANES);
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..LANES {
                acc[i] += x[i] * y[i];
            }
        }
        acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
    }
}

dispatch! {
    /// The softmax backward of one row, in place: dp[j] = p[j] * (dp[j] - r) * s.
    pub fn softmax_grad(dp: &mut [f32], p: &[f32], r: f32, s: f32) -> () {
        for (d, p) in dp.iter_mut().zip(p) {
            *d = *p * (*d - r) * s;
        }
    }
}

dispatch! {
    /// The gradient of log-softmax then gather, in place over the logits row:
    /// x[j] = -g * exp(x[j] - lse) (the target's +g is added by the caller).
    pub fn neg_softmax_scaled(x: &mut [f32], lse: f32, g: f32) -> () {
        for v in x.iter_mut() {
            *v = -g * exp(*v - lse);
        }
    }
}

dispatch! {
    /// [`neg_softmax_scaled`] plus the gradient of the row's entropy `h` scaled by `gh`, in
    /// place: x[j] = -p_j (g + gh (x[j] - lse + h)) with p_j = exp(x[j] - lse), since
    /// dH/dx_j = -p_j (log p_j + H) (the target's +g is added by the caller).
    pub fn neg_softmax_entropy_scaled(x: &mut [f32], lse: f32, g: f32, gh: f32, h: f32) -> () {
        let shift = h - lse;
        for v in x.iter_mut() {
            let p = exp(*v - lse);
            *v = -p * gh.mul_add(*v + shift, g);
        }
    }
}

dispatch! {
    /// SwiGLU forward: out[i] = silu(gate[i]) * up[i]. Writes every element of `out`, which
    /// may be uninitialized (see [`written`]).
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [Out]) -> () {
        assert!(gate.len() >= out.len() && up.len() >= out.len(), "silu_mul: short input");
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            o.write(*g / (1.0 + exp(-*g)) * *u);
        }
    }
}

dispatch! {
    /// SwiGLU backward: with s = sigmoid(g), d_gate = dy * up * s * (1 + g (1 - s)) and
    /// d_up = dy * g * s. Writes every element of both, which may be uninitialized.
    pub fn silu_mul_grad(
        dy: &[f32],
        gate: &[f32],
        up: &[f32],
        d_gate: &mut [Out],
        d_up: &mut [Out]
    ) -> () {
        let n = d_gate.len();
        assert!(
            d_up.len() == n && dy.len() >= n && gate.len() >= n && up.len() >= n,
            "silu_mul_grad: lengths"
        );
        for i in 0..n {
            let g = gate[i];
            let s = 1.0 / (1.0 + exp(-g));
            d_gate[i].write(dy[i] * up[i] * s * (1.0 + g * (1.0 - s)));
            d_up[i].write(dy[i] * g * s);
        }
    }
}

dispatch! {
    /// RMSNorm of one row: out[i] = (x[i] * inv) * w[i]. Writes every element of `out`.
    pub fn norm_row(out: &mut [Out], x: &[f32], w: &[f32], inv: f32) -> () {
        assert!(x.len() >= out.len() && w.len() >= out.len(), "norm_row: short input");
        for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
            o.write((*x * inv) * *w);
        }
    }
}

dispatch! {
    /// Σ a[i] b[i] c[i].
    pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let n = a.len().min(b.len()).min(c.len());
        let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
        let full = n / LANES * LANES;
        for j in (0..full).step_by(LANES) {
            for i in 0..LANES {
                acc[i] += a[j + i] * b[j + i] * c[j + i];
            }
        }
        let mut s = 0f32;
        for j in full..n {
            s += a[j] * b[j] * c[j];
        }
        acc.iter().sum::<f32>() + s
    }
}

dispatch! {
    /// RMSNorm backward of one row: dx[i] = inv dy[i] w[i] - c x[i], and dw[i] += dy[i] x[i] inv.
    pub fn norm_row_grad(
        dx: &mut [Out],
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        inv: f32,
        c: f32
    ) -> () {
        let n = dx.len();
        assert!(
            dw.len() >= n && dy.len() >= n && x.len() >= n && w.len() >= n,
            "norm_row_grad: short input"
        );
        for i in 0..n {
            dx[i].write(inv * dy[i] * w[i] - c * x[i]);
            dw[i] += dy[i] * x[i] * inv;
        }
    }
}

dispatch! {
    /// Rotary embedding of one head row, HF's half-rotation layout (`rotate_half`):
    /// out = x cos + [-x2, x1] sin. With `transpose`, the adjoint: out = x cos + [x2, -x1] sin
    /// with the halves of sin swapped accordingly (the backward pass).
    pub fn rope_row(out: &mut [Out], x: &[f32], cos: &[f32], sin: &[f32], transpose: bool) -> () {
        // Every element of `out` (an even length) is written.
        let half = out.len() / 2;
        assert!(
            out.len().is_multiple_of(2) && x.len() == out.len() && cos.len() == out.len() && sin.len() == out.len(),
            "rope_row: lengths"
        );
        let (o1, o2) = out.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        if transpose {
            for i in 0..half {
                o1[i].write(x1[i] * c1[i] + x2[i] * s2[i]);
                o2[i].write(x2[i] * c2[i] - x1[i] * s1[i]);
            }
        } else {
            for i in 0..half {
                o1[i].write(x1[i] * c1[i] - x2[i] * s1[i]);
                o2[i].write(x2[i] * c2[i] + x1[i] * s2[i]);
            }
        }
    }
}

/// The scalars of one AdamW update (see [`adamw`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay of this parameter (0 for norms and biases).
    pub decay: f32,
    /// Bias corrections 1 - beta^t.
    pub bc1: f32,
    pub bc2: f32,
    /// Global-norm clipping factor applied to the gradient.
    pub grad_scale: f32,
}

dispatch! {
    /// One AdamW step in place over a parameter, its gradient and both moments:
    /// m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g², x = x (1 - lr decay) - lr m̂ / (sqrt(v̂) + eps).
    pub fn adamw(x: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamWStep) -> () {
        let n = x.len().min(m.len()).min(v.len()).min(g.len());
        let keep = 1.0 - s.lr * s.decay;
        for i in 0..n {
            let gi = g[i] * s.grad_scale;
            let mi = m[i] * s.beta1 + gi * (1.0 - s.beta1);
            let vi = v[i] * s.beta2 + gi * gi * (1.0 - s.beta2);
            m[i] = mi;
            v[i] = vi;
            let update = (mi / s.bc1) / ((vi / s.bc2).sqrt() + s.eps);
            x[i] = x[i] * keep - update * s.lr;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        let mut xs = Vec::new();
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            xs.push(x);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        // The same points through this CPU's vectorized copy (its fused multiply-adds).
        let mut e = xs.clone();
        exp_shift_sum(&mut e, 0.0);
        for (a, x) in e.iter().zip(&xs) {
            let b = x.exp();
            assert!(((a - b) / b).abs() < 4e-7, "exp({x}) = {a}, libm {b}");
        }
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(100.0).is_finite());
    }

    #[test]
    fn rows_match_scalar_loops() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 13.0 - 3.0)
            .collect();
        let y: Vec<f32> = (0..37)
            .map(|i| ((i * 104729) % 97) as f32 / 17.0 - 2.0)
            .collect();
        assert_eq!(max(&x), x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let want: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot(&x, &y) - want).abs() < 1e-4);
        let m = max(&x);
        let want: f32 = x.iter().map(|v| (v - m).exp()).sum();
        assert!((sum_exp_shift(&x, m) - want).abs() < 1e-5 * want);
        let mut e = x.clone();
        let s = exp_shift_sum(&mut e, m);
        assert!((s - want).abs() < 1e-5 * want);
        for (a, b) in e.iter().zip(&x) {
            assert!((a - (b - m).exp()).abs() < 1e-6);
        }
    }
}
