//! Fused operations: attention, target-token log-probabilities, SwiGLU, RMSNorm and the rotary
//! embedding as single kernels with hand-written backward passes, and AdamW's update as one pass,
//! on burn's `flex` CPU backend.
//!
//! burn builds these from basic ops, each of which walks the whole tensor, allocates its output
//! and, under autodiff, records a node (a training step's profile: 8-11% in scalar `expf`, 15% in
//! element-wise kernels, 6% copying). The kernels are in [`kernels`]; this module makes them
//! burn operations with backend extensions ([`KilnOps`] for `Flex` and for `Autodiff<Flex>`,
//! whose backward passes are written here; [`KilnOptimOps`] for `Flex` alone), and exposes them
//! on `Tensor`.
//!
//! The same extension carries the matrix product every linear layer uses: f32 with `gemm`
//! ([`matmul_f32`], which writes its output in place where burn's matmul zeroes and then copies
//! it), or bf16 ([`bf16`], [`matmul_bf16`]) at the `bf16` [`MatmulPrecision`].
//!
//! Every function here also has the composition of burn ops it replaces ([`attention_reference`]
//! and friends). That path runs on other backends (a `cuda` build), when `KILN_FUSED=0` is set,
//! and in the tests that check each kernel and its gradient against it.

pub mod bf16;
pub mod kernels;
pub mod peak;
#[cfg(target_arch = "x86_64")]
pub mod sgemm;
pub mod simd;
pub mod skinny;
pub mod small;
pub mod team;

/// `m` rows of a product's C in blocks of about `mc` rows for its tasks ([`sgemm`], [`bf16`]):
/// as many blocks as a multiple of `threads`, each a whole number of `mr`-row panels, the same
/// number give or take one. Returns how many, and block `mb`'s first row and rows. (Blocks of
/// `mc` rows and a short last one left one thread a block more than the other: at 4,096 rows,
/// `sgemm` ran 21 blocks of 192 rows and one of 64, `bf16` 34 of 120 and one of 16; a PPO
/// minibatch's 832 rows ran as 5 x 144 + 112.)
pub(crate) fn row_blocks(
    m: usize,
    mr: usize,
    mc: usize,
    threads: usize,
) -> (usize, impl Fn(usize) -> (usize, usize)) {
    let panels = m.div_ceil(mr);
    let blocks = m
        .div_ceil(mc)
        .next_multiple_of(threads.max(1))
        .min(panels)
        .max(1);
    let rows_of = move |mb: usize| {
        let (p0, p1) = (mb * panels / blocks, (mb + 1) * panels / blocks);
        (p0 * mr, (p1 * mr).min(m) - p0 * mr)
    };
    (blocks, rows_of)
}

/// `n` values in [-1, 1) from `seed`, for the kernels' unit tests (`small`, `sgemm`).
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Int, Tensor};

use kernels::AttnSaved;

/// Registers each gradient with its parent node, for the parents that need one.
macro_rules! register_grads {
    ($grads:expr, $parents:expr, $($g:expr),+ $(,)?) => {{
        let grads: &mut Gradients = $grads;
        for (parent, g) in $parents.into_iter().zip([$($g),+]) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, g);
            }
        }
    }};
}

#[backend_extension(Flex, Autodiff)]
pub trait KilnOps: Backend {
    /// softmax(q kᵀ · scale + mask) v; q `(B, H, T, hd)`, k and v `(B, KV, S, hd)`, mask
    /// additive `(B or 1, 1, T or 1, S)` and never differentiated.
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;

    /// log softmax(logits)[target] per row: `(N, V)`, `(N)` -> `(N)`.
    fn kiln_token_logprobs(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// log softmax(hidden · head)[target] per row, `(N, d)`, `(d, V)`, `(N)` -> `(N)`, chunk by
    /// chunk of rows without the `(N, V)` logits; the products at bf16 when `bf16`. With
    /// `entropy`, `(N, 2)`: each row's log-probability and the entropy of its distribution,
    /// both differentiable.
    fn kiln_head_logprobs(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        bf16: bool,
        rows: usize,
        entropy: bool,
    ) -> FloatTensor<Self>;

    /// Σ_i coef_i · log softmax(hidden · head)_i[target_i], `(1)`, chunk by chunk as
    /// [`Self::kiln_head_logprobs`]; `coef (N)` is never differentiated, so the gradients are
    /// computed in the same pass and the backward pass only scales them.
    fn kiln_head_logprob_sum(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        coef: FloatTensor<Self>,
        bf16: bool,
        rows: usize,
        train_head: bool,
    ) -> FloatTensor<Self>;

    /// silu(gate) * up, element-wise.
    fn kiln_silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// RMSNorm over the last dimension with gain `weight`.
    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;

    /// Rotary embedding of `x (B, H, T, hd)` with tables `cos, sin (B, 1, T, hd)` (never
    /// differentiated).
    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// `a (M, K) · b (K, N)` in f32, or with `bf16`, both rounded to bf16 and the products
    /// summed in f32.
    fn kiln_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, bf16: bool) -> FloatTensor<Self>;
}

impl KilnOps for Flex {
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        kernels::attention(q, k, v, mask, scale, false).0
    }

    fn kiln_token_logprobs(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        kernels::token_logprobs(&logits, &targets).0
    }

    fn kiln_head_logprobs(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        bf16: bool,
        rows: usize,
        entropy: bool,
    ) -> FloatTensor<Self> {
        kernels::head_logprobs(&hidden, &head, &targets, bf16, rows, entropy).0
    }

    fn kiln_head_logprob_sum(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        coef: FloatTensor<Self>,
        bf16: bool,
        rows: usize,
        _train_head: bool,
    ) -> FloatTensor<Self> {
        let (lp, _) = kernels::head_logprobs(&hidden, &head, &targets, bf16, rows, false);
        kernels::weighted_sum(kernels::elems(&lp), &coef)
    }

    fn kiln_silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::silu_mul(&gate, &up)
    }

    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        kernels::rms_norm(&x, &weight, eps).0
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        kernels::rope(&x, &cos, &sin, false)
    }

    fn kiln_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, bf16: bool) -> FloatTensor<Self> {
        kernels::matmul(&a, false, &b, false, bf16)
    }
}

/// The optimizer's fused update. It runs on parameters outside the autodiff graph, so only the
/// inner backend implements it.
#[backend_extension(Flex)]
pub trait KilnOptimOps: Backend {
    /// One AdamW step: returns the parameter and both moments after it. Tensors are flat and of
    /// one length.
    fn kiln_adamw(
        x: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        step: simd::AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The sum of the squares of all elements, `(1)` (a gradient's share of the global norm).
    fn kiln_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl KilnOptimOps for Flex {
    fn kiln_adamw(
        x: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        step: simd::AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        kernels::adamw(x, m, v, &g, step)
    }

    fn kiln_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::sum_squares(&x)
    }
}

/// Products for inference only (no autodiff graph), on the inner backend.
#[backend_extension(Flex)]
pub trait KilnInferOps: Backend {
    /// `a (M, K) · b (K, N)` by [`skinny`]'s kernel (meant for the products [`skinny::takes`]):
    /// f32, with the weight rounded to bf16 at the `bf16` precision ([`kernels::matmul_rows`]).
    fn kiln_matmul_rows(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The entropy of softmax over each row of `logits (N, V)`, `(N)`.
    fn kiln_entropy(logits: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl KilnInferOps for Flex {
    fn kiln_matmul_rows(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::matmul_rows(&a, &b)
    }

    fn kiln_entropy(logits: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::entropy(&logits)
    }
}

/// `a (M, K) · b (K, N)` by [`skinny`]'s few-rows kernel, whatever M; both outside the autodiff
/// graph. f32, except that at the `bf16` precision ([`bf16_decoding`]) the weight is read as
/// bf16. [`matmul`] calls it for decoding steps; public for its tests and benchmark.
pub fn matmul_rows(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as KilnInferOps>::kiln_matmul_rows(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

/// One AdamW step on flat tensors outside the autodiff graph (all four on the inner backend):
/// `(x, m, v)` after the update.
/// Fused into one pass on the `flex` backend (the unfused update is 14 tensor operations, each a
/// pass over the parameter and an allocation).
pub fn adamw(
    x: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    g: Tensor<1>,
    step: simd::AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    if !enabled() {
        return adamw_reference(x, m, v, g, step);
    }
    let (x, m, v) = <Dispatch as KilnOptimOps>::kiln_adamw(
        x.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        g.into_dispatch(),
        step,
    );
    (
        Tensor::from_dispatch(x),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// The sum of the squares of the elements of a tensor outside the autodiff graph, as a number:
/// one parallel pass that reads it in place (on the `flex` backend; burn's `square().sum()`
/// writes the squares out first, which took 3 ms of a PPO minibatch's 10 ms optimizer step).
pub fn sum_squares<const D: usize>(x: Tensor<D>) -> f64 {
    if !enabled() {
        return crate::to_vec(x.square().sum())[0] as f64;
    }
    let s = <Dispatch as KilnOptimOps>::kiln_sum_squares(x.into_dispatch());
    crate::to_vec(Tensor::<1>::from_dispatch(s))[0] as f64
}

/// [`adamw`] from burn ops.
pub fn adamw_reference(
    x: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    g: Tensor<1>,
    s: simd::AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let g = g * s.grad_scale as f64;
    let m = m * s.beta1 as f64 + g.clone() * (1.0 - s.beta1 as f64);
    let v = v * s.beta2 as f64 + g.square() * (1.0 - s.beta2 as f64);
    let update = (m.clone() / s.bc1 as f64) / ((v.clone() / s.bc2 as f64).sqrt() + s.eps as f64);
    let x = x * (1.0 - s.lr as f64 * s.decay as f64) - update * s.lr as f64;
    (x, m, v)
}

type Ad<C> = Autodiff<Flex, C>;

impl<C: CheckpointStrategy> KilnOps for Ad<C> {
    fn kiln_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attention;

        impl Backward<Flex, 3> for Attention {
            type State = AttnSaved;

            fn backward(self, ops: Ops<AttnSaved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<Flex>(&ops.node);
                let (dq, dk, dv) = kernels::attention_backward(ops.state, grad);
                register_grads!(grads, ops.parents, dq, dk, dv);
            }
        }

        let mask = mask.into_primitive();
        match Attention
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, saved) = kernels::attention(
                    q.into_primitive(),
                    k.into_primitive(),
                    v.into_primitive(),
                    mask,
                    scale,
                    true,
                );
                prep.finish(saved.expect("kept for backward"), out)
            }
            OpsKind::UnTracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                prep.finish(kernels::attention(q, k, v, mask, scale, false).0)
            }
        }
    }

    fn kiln_token_logprobs(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct TokenLogprobs;

        /// Logits, targets and each row's log-sum-exp.
        type LpState = (FloatTensor<Flex>, IntTensor<Flex>, FloatTensor<Flex>);

        impl Backward<Flex, 1> for TokenLogprobs {
            type State = LpState;

            fn backward(self, ops: Ops<LpState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<Flex>(&ops.node);
                let (logits, targets, lse) = ops.state;
                if let [Some(node)] = ops.parents {
                    let d = kernels::token_logprobs_backward(logits, &targets, &lse, &grad);
                    grads.register::<Flex>(node.id, d);
                }
            }
        }

        match TokenLogprobs
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = logits.into_primitive();
                let (lp, lse) = kernels::token_logprobs(&logits, &targets);
                prep.finish((logits, targets, lse), lp)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(kernels::token_logprobs(logits.primitive(), &targets).0)
            }
        }
    }

    fn kiln_head_logprobs(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        bf16: bool,
        rows: usize,
        entropy: bool,
    ) -> FloatTensor<Self> {
        /// The products' precision and the chunks' rows; the backward pass runs the same.
        #[derive(Debug)]
        struct HeadLogprobs {
            bf16: bool,
            rows: usize,
        }

        /// Hidden states, head, targets, each row's log-sum-exp and (with `entropy`) each row's
        /// entropy: no logits.
        type HeadState = (
            FloatTensor<Flex>,
            FloatTensor<Flex>,
            IntTensor<Flex>,
            FloatTensor<Flex>,
            Option<Vec<f32>>,
        );

        impl Backward<Flex, 2> for HeadLogprobs {
            type State = HeadState;

            fn backward(self, ops: Ops<HeadState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<Flex>(&ops.node);
                let (h, w, targets, lse, ent) = ops.state;
                // With the entropy, (N, 2): each row's gradient of its log-probability and of
                // its entropy.
                let g_ent: Vec<f32>;
                let (grad, entropy) = match &ent {
                    Some(ent) => {
                        let g = kernels::contiguous(grad);
                        let g_lp: Vec<f32>;
                        (g_lp, g_ent) = kernels::elems(&g).chunks(2).map(|c| (c[0], c[1])).unzip();
                        let n = g_lp.len();
                        let entropy = kernels::Entropy::Grad { ent, grad: &g_ent };
                        (kernels::tensor(g_lp, vec![n]), entropy)
                    }
                    None => (grad, kernels::Entropy::Off),
                };
                let [ph, pw] = ops.parents;
                let need = (ph.is_some(), pw.is_some());
                let pass = kernels::head_chunks(
                    &h,
                    &w,
                    &targets,
                    self.bf16,
                    self.rows,
                    Some(&lse),
                    Some(&grad),
                    need,
                    entropy,
                );
                for (node, g) in [(ph, pass.dh), (pw, pass.dw)] {
                    if let (Some(node), Some(g)) = (node, g) {
                        grads.register::<Flex>(node.id, g);
                    }
                }
            }
        }

        match (HeadLogprobs { bf16, rows })
            .prepare::<C>([hidden.node(), head.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (h, w) = (hidden.into_primitive(), head.into_primitive());
                let (out, lse) = kernels::head_logprobs(&h, &w, &targets, bf16, rows, entropy);
                let ent = entropy.then(|| kernels::elems(&out).chunks(2).map(|c| c[1]).collect());
                prep.finish((h, w, targets, lse, ent), out)
            }
            OpsKind::UnTracked(prep) => {
                let (h, w) = (hidden.primitive(), head.primitive());
                prep.finish(kernels::head_logprobs(h, w, &targets, bf16, rows, entropy).0)
            }
        }
    }

    fn kiln_head_logprob_sum(
        hidden: FloatTensor<Self>,
        head: FloatTensor<Self>,
        targets: IntTensor<Self>,
        coef: FloatTensor<Self>,
        bf16: bool,
        rows: usize,
        train_head: bool,
    ) -> FloatTensor<Self> {
        /// The gradients of the sum, computed with it.
        #[derive(Debug)]
        struct HeadLogprobSum;

        type SumState = (Option<FloatTensor<Flex>>, Option<FloatTensor<Flex>>);

        impl Backward<Flex, 2> for HeadLogprobSum {
            type State = SumState;

            fn backward(self, ops: Ops<SumState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<Flex>(&ops.node);
                let s = kernels::scalar(&grad);
                let [ph, pw] = ops.parents;
                let (dh, dw) = ops.state;
                assert!(
                    pw.is_none() || dw.is_some(),
                    "head_logprob_sum: the head takes gradients, but train_head was false"
                );
                for (node, g) in [(ph, dh), (pw, dw)] {
                    if let (Some(node), Some(g)) = (node, g) {
                        grads.register::<Flex>(node.id, kernels::scaled(g, s));
                    }
                }
            }
        }

        let coef = coef.into_primitive();
        match HeadLogprobSum
            .prepare::<C>([hidden.node(), head.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                // Which inputs take gradients is not known here (burn keeps it private): the
                // hidden states always do in training, the head's says the caller.
                let need = (true, train_head);
                let (h, w) = (hidden.into_primitive(), head.into_primitive());
                let pass = kernels::head_chunks(
                    &h,
                    &w,
                    &targets,
                    bf16,
                    rows,
                    None,
                    Some(&coef),
                    need,
                    kernels::Entropy::Off,
                );
                let sum = kernels::weighted_sum(&pass.lp, &coef);
                prep.finish((pass.dh, pass.dw), sum)
            }
            OpsKind::UnTracked(prep) => {
                let (h, w) = (hidden.primitive(), head.primitive());
                let (lp, _) = kernels::head_logprobs(h, w, &targets, bf16, rows, false);
                prep.finish(kernels::weighted_sum(kernels::elems(&lp), &coef))
            }
        }
    }

    fn kiln_silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SiluMul;

        impl Backward<Flex, 2> for SiluMul {
            type State = (FloatTensor<Flex>, FloatTensor<Flex>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<Flex>(&ops.node);
                let (gate, up) = ops.state;
                let (dg, du) = kernels::silu_mul_backward(&gate, &up, &dy);
                register_grads!(grads, ops.parents, dg, du);
            }
        }

        match SiluMul
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (g, u) = (gate.into_primitive(), up.into_primitive());
                let out = kernels::silu_mul(&g, &u);
                prep.finish((g, u), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(kernels::silu_mul(gate.primitive(), up.primitive()))
            }
        }
    }

    fn kiln_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNorm;

        /// Input, weight and each row's 1 / rms.
        type NormState = (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>);

        impl Backward<Flex, 2> for RmsNorm {
            type State = NormState;

            fn backward(self, ops: Ops<NormState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let dy = grads.consume::<Flex>(&ops.node);
                let (x, w, inv) = ops.state;
                let (dx, dw) = kernels::rms_norm_backward(&x, &w, &inv, &dy);
                register_grads!(grads, ops.parents, dx, dw);
            }
        }

        match RmsNorm
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, w) = (x.into_primitive(), weight.into_primitive());
                let (out, inv) = kernels::rms_norm(&x, &w, eps);
                prep.finish((x, w, inv), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(kernels::rms_norm(x.primitive(), weight.primitive(), eps).0)
            }
        }
    }

    fn kiln_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Rope;

        impl Backward<Flex, 1> for Rope {
            type State = (FloatTensor<Flex>, FloatTensor<Flex>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<Flex>(&ops.node);
                let (cos, sin) = ops.state;
                if let [Some(node)] = ops.parents {
                    grads.register::<Flex>(node.id, kernels::rope(&dy, &cos, &sin, true));
                }
            }
        }

        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match Rope.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = kernels::rope(x.primitive(), &cos, &sin, false);
                prep.finish((cos, sin), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(kernels::rope(x.primitive(), &cos, &sin, false))
            }
        }
    }

    fn kiln_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, bf16: bool) -> FloatTensor<Self> {
        /// The product at one precision; its backward pass runs at the same one.
        #[derive(Debug)]
        struct Matmul {
            bf16: bool,
        }

        impl Backward<Flex, 2> for Matmul {
            type State = (FloatTensor<Flex>, FloatTensor<Flex>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dc = grads.consume::<Flex>(&ops.node);
                let (a, b) = ops.state;
                let [pa, pb] = ops.parents;
                // dA = dC Bᵀ and dB = Aᵀ dC, each only when needed (a frozen weight has no
                // node), read through transposed strides, never copied.
                if let Some(node) = pa {
                    let da = kernels::matmul(&dc, false, &b, true, self.bf16);
                    grads.register::<Flex>(node.id, da);
                }
                if let Some(node) = pb {
                    let db = kernels::matmul(&a, true, &dc, false, self.bf16);
                    grads.register::<Flex>(node.id, db);
                }
            }
        }

        let op = Matmul { bf16 };
        match op
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (a, b) = (a.into_primitive(), b.into_primitive());
                let out = kernels::matmul(&a, false, &b, false, bf16);
                prep.finish((a, b), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(kernels::matmul(
                a.primitive(),
                false,
                b.primitive(),
                false,
                bf16,
            )),
        }
    }
}

/// Whether the fused kernels run: on the `flex` backend (every build without `cuda`, `wgpu` or
/// `vulkan`), unless `KILN_FUSED=0` asks for burn's unfused ops (for comparisons).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(not(any(feature = "cuda", feature = "wgpu")))
            && std::env::var("KILN_FUSED").map_or(true, |v| v != "0")
    })
}

/// The precision of the linear layers' matrix products (PyTorch's
/// `torch.set_float32_matmul_precision`, "highest" and "medium"): `f32`, or `bf16` inputs with f32
/// sums (weights, gradients, optimizer state and every other operation stay f32, as under
/// `torch.autocast(dtype=torch.bfloat16)`). Process-wide; training sets it from its config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(MatmulPrecision::F32),
            "bf16" => Ok(MatmulPrecision::Bf16),
            _ => Err(format!(
                "unknown matmul precision {s:?} (expected f32 or bf16)"
            )),
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        })
    }
}

static PRECISION: AtomicBool = AtomicBool::new(false);

/// Sets the precision of every later linear-layer product in this process.
pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p == MatmulPrecision::Bf16, Ordering::Relaxed);
}

/// The precision set by [`set_matmul_precision`] (f32 until then).
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(Ordering::Relaxed) {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// Whether linear-layer products run in bf16 now: asked for, the fused kernels on, and the CPU
/// has AVX512-BF16 on which bf16 products are faster ([`bf16::pays`]). Elsewhere the products
/// stay f32, which is faster there (as PyTorch treats "medium" as a permission, not an order).
pub fn bf16_active() -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && enabled() && bf16::pays()
}

/// Whether decoding's few-rows products read their weights as bf16 now
/// ([`kernels::matmul_rows`]): asked for, the fused kernels on, and the CPU has AVX512-BF16 (the
/// same CPUs as [`bf16_active`], and those where bf16 training products would be slower, since
/// decoding waits on memory).
pub fn bf16_decoding() -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && enabled() && bf16::native()
}

/// The precision training's products run at now ([`bf16_active`]), and decoding's
/// ([`bf16_decoding`]): what was asked for, less what this CPU makes f32.
pub fn precision_in_effect() -> (MatmulPrecision, MatmulPrecision) {
    let p = |bf16| {
        if bf16 {
            MatmulPrecision::Bf16
        } else {
            MatmulPrecision::F32
        }
    };
    (p(bf16_active()), p(bf16_decoding()))
}

/// Below this many rows a product stays f32: packing both operands costs more than the bf16
/// arithmetic saves (measured: 0.7x f32 at 64 rows, 1.6x at 4096).
const BF16_MIN_ROWS: usize = 256;

/// `x (..., K) · w (K, N)`: the product of every linear layer, at [`matmul_precision`], as one
/// of Kiln's products ([`matmul_f32`], [`matmul_bf16`]); a decoding step's few rows (those
/// [`skinny::takes`], outside autodiff) take [`matmul_rows`]. With the fused kernels off, burn's
/// matmul.
pub fn matmul<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    if !enabled() {
        return x.matmul(w.unsqueeze());
    }
    let dims = x.dims();
    let k = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    let n = w.dims()[1];
    let x = x.reshape([m, k]);
    let y = if skinny::takes(m, k, n) && few_rows_ok(&x, &w) {
        matmul_rows(x, w)
    } else if bf16_active() && m >= BF16_MIN_ROWS {
        matmul_bf16(x, w)
    } else {
        matmul_f32(x, w)
    };
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// Whether a product may take the few-rows kernel: fused kernels on, the CPU has a copy of it,
/// and neither operand in an autodiff graph (the kernel has no backward pass; decoding never
/// needs one). At bf16 precision too: products under [`BF16_MIN_ROWS`] stay f32 anyway.
fn few_rows_ok<const D: usize>(x: &Tensor<D>, w: &Tensor<2>) -> bool {
    enabled() && skinny::available() && !x.is_autodiff() && !w.is_autodiff()
}

/// `a (M, K) · b (K, N)` with bf16 inputs and f32 sums, whatever the precision setting (on a CPU
/// without AVX512-BF16, in portable code), differentiable in both.
pub fn matmul_bf16(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
        true,
    ))
}

/// `a (M, K) · b (K, N)` in f32, differentiable in both: on `sgemm` where it is available (AMD's
/// AVX-512 CPUs, `KILN_SGEMM`), else on `gemm`, the crate and call burn's matmul makes. Unlike
/// burn's matmul it does not zero its output and then copy it to realign the buffer (measured on
/// a Zen 3: 5.6% of a training step between the two).
pub fn matmul_f32(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
        false,
    ))
}

/// `x · w + bias`, with the product at [`matmul_precision`] ([`matmul`]).
pub fn linear<const D: usize>(x: Tensor<D>, w: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    if !enabled() {
        return burn::tensor::module::linear(x, w, bias);
    }
    let y = matmul(x, w);
    match bias {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

/// Scaled dot-product attention, `q (B, H, T, hd)`, `k, v (B, KV, S, hd)` with H a multiple of
/// KV, additive `mask (B or 1, 1, T, S)`. Returns `(B, H, T, hd)`.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4>,
    scale: f32,
) -> Tensor<4> {
    if !enabled() {
        return attention_reference(q, k, v, mask, scale);
    }
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        mask.into_dispatch(),
        scale,
    ))
}

/// [`attention`] from burn ops.
pub fn attention_reference(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4>,
    scale: f32,
) -> Tensor<4> {
    let rep = q.dims()[1] / k.dims()[1];
    let (k, v) = (repeat_kv(k, rep), repeat_kv(v, rep));
    let scores = q.matmul(k.swap_dims(2, 3)) * scale as f64 + mask;
    softmax(scores, 3).matmul(v)
}

/// Expands `(B, KV, S, hd)` key/value heads to `(B, KV * n_rep, S, hd)`, as HF's `repeat_kv`.
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, s, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, s, hd])
        .reshape([b, kvh * n_rep, s, hd])
}

/// log softmax(logits)[target] over the last dimension: `(N, V)`, `(N)` -> `(N)`.
pub fn token_logprobs(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    if !enabled() {
        return token_logprobs_reference(logits, targets);
    }
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_token_logprobs(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// The log-probability of each target under the head `w (d, V)` at hidden states `hidden (N,
/// d)`: `token_logprobs(hidden · w, targets)`, without the `(N, V)` logits. Chunks of rows
/// ([`kernels::head_chunk_rows`]: 64 MiB of logits at a time) run the head product, the
/// log-softmax and (backward) the logits' gradient and both products of the head's gradients in
/// turn; the backward pass recomputes each chunk's logits, one more product the size of the
/// head's forward pass. `w` may be any view (a tied head's transposed embedding). The products
/// run at [`matmul_precision`]. With the fused kernels off, the unfused composition.
pub fn head_logprobs(hidden: Tensor<2>, w: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let rows = kernels::head_chunk_rows(hidden.dims()[0], w.dims()[1]);
    head_logprobs_in_chunks(hidden, w, targets, rows)
}

/// [`head_logprobs`] in chunks of `rows` rows (its tests take small ones).
pub fn head_logprobs_in_chunks(
    hidden: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    rows: usize,
) -> Tensor<1> {
    if !enabled() {
        return token_logprobs_reference(hidden.matmul(w), targets);
    }
    Tensor::from_dispatch(head_dispatch(hidden, w, targets, rows, false))
}

/// The chunked head op ([`KilnOps::kiln_head_logprobs`]): `(N)`, or with `entropy` `(N, 2)`. A
/// chunk's products run at bf16 where a product of its rows would ([`matmul`]).
fn head_dispatch(
    hidden: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    rows: usize,
    entropy: bool,
) -> FloatTensor<Dispatch> {
    let bf16 = bf16_active() && rows.min(hidden.dims()[0]) >= BF16_MIN_ROWS;
    <Dispatch as KilnOps>::kiln_head_logprobs(
        hidden.into_dispatch(),
        w.into_dispatch(),
        targets.into_dispatch(),
        bf16,
        rows,
        entropy,
    )
}

/// [`head_logprobs`] and the entropy of each row's distribution softmax(hidden_i · w), both
/// `(N)` and both differentiable (PPO's policy: its log-probabilities and entropy bonus) from one
/// chunked pass: the `(N, V)` logits are never held, and the backward pass recomputes each
/// chunk's (the entropy's gradient, -p_j (log p_j + H), joins the log-probabilities' over the
/// same logits). With the fused kernels off, the unfused composition.
pub fn head_logprobs_entropy(
    hidden: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
) -> (Tensor<1>, Tensor<1>) {
    let rows = kernels::head_chunk_rows(hidden.dims()[0], w.dims()[1]);
    head_logprobs_entropy_in_chunks(hidden, w, targets, rows)
}

/// [`head_logprobs_entropy`] in chunks of `rows` rows (its tests take small ones).
pub fn head_logprobs_entropy_in_chunks(
    hidden: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    rows: usize,
) -> (Tensor<1>, Tensor<1>) {
    let n = hidden.dims()[0];
    if !enabled() {
        let logits = hidden.matmul(w);
        let ent = entropy_reference(logits.clone());
        return (token_logprobs_reference(logits, targets), ent);
    }
    let both: Tensor<2> = Tensor::from_dispatch(head_dispatch(hidden, w, targets, rows, true));
    (
        both.clone().slice([0..n, 0..1]).reshape([n]),
        both.slice([0..n, 1..2]).reshape([n]),
    )
}

/// Σ_i coef_i · log softmax(hidden_i · w)[target_i] as a `(1)` tensor: a cross-entropy (`coef`
/// = -1/N for a mean) through [`head_logprobs`]'s chunks, but with the per-row gradient
/// known before the pass, so the gradients of `hidden` and (when `train_head`) of `w` are
/// computed in the same pass over each chunk's logits (Liger's fused linear cross-entropy) and
/// the backward pass only scales them: no product more than the whole logits take, and no
/// `(N, V)` tensor held. `coef` is never differentiated; the gradient of a head that takes one
/// must be asked for with `train_head` (a frozen one, LoRA's, saves its product).
pub fn head_logprob_sum(
    hidden: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    coef: Tensor<1>,
    train_head: bool,
) -> Tensor<1> {
    let rows = kernels::head_chunk_rows(hidden.dims()[0], w.dims()[1]);
    head_logprob_sum_in_chunks(hidden, w, targets, coef, train_head, rows)
}

/// [`head_logprob_sum`] in chunks of `rows` rows (its tests take small ones).
pub fn head_logprob_sum_in_chunks(
    hidden: Tensor<2>,
    w: Tensor<2>,
    targets: Tensor<1, Int>,
    coef: Tensor<1>,
    train_head: bool,
    rows: usize,
) -> Tensor<1> {
    if !enabled() {
        return (token_logprobs_reference(hidden.matmul(w), targets) * coef).sum();
    }
    let bf16 = bf16_active() && rows.min(hidden.dims()[0]) >= BF16_MIN_ROWS;
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_head_logprob_sum(
        hidden.into_dispatch(),
        w.into_dispatch(),
        targets.into_dispatch(),
        coef.into_dispatch(),
        bf16,
        rows,
        train_head,
    ))
}

/// Whether the mean cross-entropy runs the head chunk by chunk ([`head_logprob_sum`] under
/// [`crate::Llama::mean_nll`]): with the fused kernels, unless `KILN_CHUNKED_HEAD=0` asks for the
/// whole logits (for comparisons).
pub fn chunked_head() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    enabled() && *ON.get_or_init(|| std::env::var("KILN_CHUNKED_HEAD").map_or(true, |v| v != "0"))
}

/// Bytes of `(N, V)` logits from which [`crate::Llama::target_logprobs`] takes
/// [`head_logprobs`]'s chunks rather than the whole logits: `KILN_LOGITS_MB` megabytes (0: always
/// chunk), 512 MiB by default. Below it the whole logits cost their memory and save the chunks'
/// recomputed product (the `tiny` and `small` presets' training steps hold 64 and 128 MiB).
pub fn logits_budget() -> usize {
    LOGITS_BUDGET.get()
}

static LOGITS_BUDGET: MibBudget = MibBudget::new("KILN_LOGITS_MB", 512);

/// Sets [`logits_budget`] for the rest of the process, in place of `KILN_LOGITS_MB`: a test
/// binary compares the chunked and whole-logits paths of one computation (process-wide, so
/// such a binary runs one test).
pub fn set_logits_budget(bytes: usize) {
    LOGITS_BUDGET.set(bytes)
}

/// A budget in bytes that the process reads once from an environment variable in MiB (or takes
/// its default), and that a test or a benchmark may set for the rest of the process:
/// [`logits_budget`], [`kernels::keep_probs_max`].
pub(crate) struct MibBudget {
    var: &'static str,
    default_mib: usize,
    /// The bytes; `usize::MAX` until first read.
    bytes: std::sync::atomic::AtomicUsize,
}

impl MibBudget {
    pub(crate) const fn new(var: &'static str, default_mib: usize) -> Self {
        MibBudget {
            var,
            default_mib,
            bytes: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }

    pub(crate) fn get(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        match self.bytes.load(Relaxed) {
            usize::MAX => {
                let mib = std::env::var(self.var)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(self.default_mib);
                let bytes = mib.saturating_mul(1 << 20).min(usize::MAX - 1);
                self.bytes.store(bytes, Relaxed);
                bytes
            }
            bytes => bytes,
        }
    }

    /// In bytes, for the rest of the process (`usize::MAX` means no limit, as `usize::MAX - 1`).
    pub(crate) fn set(&self, bytes: usize) {
        let bytes = bytes.min(usize::MAX - 1);
        self.bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// [`token_logprobs`] from burn ops.
pub fn token_logprobs_reference(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let n = logits.dims()[0];
    log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
}

/// silu(gate) * up.
pub fn silu_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if !enabled() {
        return silu_mul_reference(gate, up);
    }
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_silu_mul(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// [`silu_mul`] from burn ops.
pub fn silu_mul_reference<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    silu(gate) * up
}

/// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) * weight.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    if !enabled() {
        return rms_norm_reference(x, weight, eps);
    }
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_rms_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        eps as f32,
    ))
}

/// [`rms_norm`] from burn ops, as `LlamaRMSNorm`.
pub fn rms_norm_reference<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    let variance = x.clone().square().mean_dim(D - 1); // (..., 1)
    let normed = x * (variance + eps).sqrt().recip();
    normed * weight.unsqueeze()
}

/// Rotary embedding, HF's half-rotation layout: x cos + rotate_half(x) sin, with
/// rotate_half(x) = [-x2, x1]; `x (B, H, T, hd)`, `cos, sin (B, 1, T, hd)`.
pub fn rope(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    if !enabled() {
        return rope_reference(x, cos, sin);
    }
    Tensor::from_dispatch(<Dispatch as KilnOps>::kiln_rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// [`rope`] from burn ops.
pub fn rope_reference(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// The entropy of softmax over each row of `logits (N, V)`, `(N)`, outside the autodiff graph
/// (a measurement, as PPO's logged entropy): on the `flex` backend the rows in parallel, read in
/// place, in one pass each.
pub fn entropy(logits: Tensor<2>) -> Tensor<1> {
    let logits = logits.inner();
    if !enabled() {
        return entropy_reference(logits);
    }
    Tensor::from_dispatch(<Dispatch as KilnInferOps>::kiln_entropy(
        logits.into_dispatch(),
    ))
}

/// [`entropy`] from burn ops, `-Σ p log p` per row, differentiable where `logits` is (PPO's
/// entropy bonus from held logits, and the unfused path of [`head_logprobs_entropy`]).
pub fn entropy_reference(logits: Tensor<2>) -> Tensor<1> {
    let n = logits.dims()[0];
    let lp = log_softmax(logits, 1);
    lp.clone().exp().mul(lp).sum_dim(1).neg().reshape([n])
}

#[cfg(test)]
mod tests {
    use super::row_blocks;

    /// The blocks tile `0..m` in order, start on panel boundaries, are as many as a multiple of
    /// the threads wherever there are panels enough, and differ by at most one panel.
    #[test]
    fn row_blocks_split_the_rows_evenly_in_whole_panels() {
        for (m, mr, mc, threads) in [
            (4096, 6, 192, 2),
            (4096, 12, 120, 2),
            (832, 6, 192, 2),
            (300, 12, 120, 2),
            (7, 6, 192, 2),
            (1, 12, 120, 4),
            (1000, 6, 192, 3),
        ] {
            let (blocks, rows_of) = row_blocks(m, mr, mc, threads);
            let panels = m.div_ceil(mr);
            assert!(
                blocks % threads == 0 || blocks == panels,
                "{m} rows: {blocks} blocks"
            );
            let mut next = 0;
            let sizes: Vec<usize> = (0..blocks)
                .map(|mb| {
                    let (r0, rows) = rows_of(mb);
                    assert_eq!(r0, next, "{m} rows: block {mb} starts at {r0}");
                    assert_eq!(r0 % mr, 0);
                    next += rows;
                    rows.div_ceil(mr)
                })
                .collect();
            assert_eq!(next, m, "{m} rows: the blocks cover {next}");
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "{m} rows: blocks of {sizes:?} panels");
            assert!(*lo >= 1, "{m} rows: an empty block");
            assert!(
                hi * mr <= mc.max(mr) * 2,
                "{m} rows: blocks of {hi} panels of {mr}"
            );
        }
    }
}
