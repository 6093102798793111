//! Fused operations: attention, target-token log-probabilities and SwiGLU as single kernels with
//! hand-written backward passes, on burn's `flex` CPU backend.
//!
//! burn builds these from basic ops, each of which walks the whole tensor, allocates its output
//! and, under autodiff, records a node (a training step's profile: 8-11% in scalar `expf`, 15% in
//! element-wise kernels, 6% copying). The kernels are in [`kernels`]; this module makes them
//! burn operations with a backend extension ([`KilnOps`]) implemented for `Flex` and for
//! `Autodiff<Flex>` (whose backward passes are written here), and exposes them on `Tensor`.
//!
//! Every function here also has the composition of burn ops it replaces ([`attention_reference`]
//! and friends). That path runs on other backends (a `cuda` build), when `KILN_FUSED=0` is set,
//! and in the tests that check each kernel and its gradient against it.

pub mod kernels;
pub mod simd;

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

    /// silu(gate) * up, element-wise.
    fn kiln_silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
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

    fn kiln_silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        kernels::silu_mul(&gate, &up)
    }
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
                let [pq, pk, pv] = ops.parents;
                for (parent, g) in [(pq, dq), (pk, dk), (pv, dv)] {
                    if let Some(node) = parent {
                        grads.register::<Flex>(node.id, g);
                    }
                }
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
                let [pg, pu] = ops.parents;
                for (parent, g) in [(pg, dg), (pu, du)] {
                    if let Some(node) = parent {
                        grads.register::<Flex>(node.id, g);
                    }
                }
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
}

/// Whether the fused kernels run: on the `flex` backend (every build without `cuda`), unless
/// `KILN_FUSED=0` asks for burn's unfused ops (for comparisons).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(not(feature = "cuda")) && std::env::var("KILN_FUSED").map_or(true, |v| v != "0")
    })
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
