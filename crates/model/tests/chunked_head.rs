//! The chunked language-model head against the whole logits (`forward` then `token_logprobs`):
//! the same values and the same gradients of every weight they touch, for an untied head, a
//! head tied to the embedding and a frozen head.
//! - `Llama::target_logprobs` past the logits budget: with `KILN_LOGITS_MB=0` every call takes
//!   `fused::head_logprobs`. A test binary of its own, because the budget is read once per
//!   process.
//! - `Llama::mean_nll` (`fused::head_logprob_sum`, gradients computed in the forward pass), as
//!   the trainer scales it.

use kiln_model::burn::tensor::{Int, Tensor, TensorData};
use kiln_model::{
    cross_entropy, default_device, fused, to_vec, token_logprobs, ForwardInput, Llama, LlamaConfig,
};

/// How the loss is taken.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Path {
    /// `forward`, then `token_logprobs` (or `cross_entropy`): the whole logits.
    Whole,
    /// `target_logprobs` past its budget.
    Chunked,
    /// `cross_entropy` of the whole logits, scaled.
    WholeMean,
    /// `mean_nll`, scaled.
    MeanNll,
}

/// Log-probabilities of each row's next tokens and the gradients of their weighted sum with
/// respect to the embedding, the final norm, a layer's down projection and the untied head.
fn run(tied: bool, frozen_head: bool, path: Path) -> Vec<(&'static str, Vec<f32>)> {
    let device = default_device().autodiff();
    let mut config = LlamaConfig::new(96, 32, 64, 2, 4, 2, 48);
    config.initializer_range = 0.2;
    config.tie_word_embeddings = tied;
    let mut model = Llama::init(&config, 7, &device).unwrap();
    if frozen_head {
        let head = model.lm_head.take().expect("an untied head");
        model.lm_head = Some(burn::nn::Linear {
            weight: head.weight.set_require_grad(false),
            bias: head.bias,
        });
    }
    let (b, t) = (3, 10);
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..=t)
                .map(|j| ((5 + 13 * i + 7 * j) % 96) as u32)
                .collect()
        })
        .collect();
    let inputs: Vec<Vec<u32>> = rows.iter().map(|r| r[..t].to_vec()).collect();
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|r| r[1..].iter().map(|&x| x as i64))
        .collect();
    let n = b * t;
    let input = ForwardInput::causal(&inputs, &device);
    let flat = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [n]), &device);
    let rows2 = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
    let weights: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.3).collect();
    let weights = Tensor::<1>::from_data(TensorData::new(weights, [n]), &device);
    let hidden = || model.hidden(&input, None).reshape([n, 32]);
    // The trainer scales each half's loss (scale · its share of the batch).
    let (lp, loss) = match path {
        Path::Whole => {
            let lp = token_logprobs(model.forward(&input, None), rows2).reshape([n]);
            (lp.clone(), (lp * weights).sum())
        }
        Path::Chunked => {
            let lp = model.target_logprobs(hidden(), flat);
            (lp.clone(), (lp * weights).sum())
        }
        Path::WholeMean => {
            let ones = Tensor::ones([b, t], &device);
            let l = cross_entropy(model.forward(&input, None), rows2, ones);
            (l.clone(), l * 0.37)
        }
        Path::MeanNll => {
            let l = model.mean_nll(hidden(), flat);
            (l.clone(), l * 0.37)
        }
    };
    let grads = loss.backward();
    let mut out = vec![
        ("logprobs", to_vec(lp)),
        (
            "embedding",
            to_vec(model.model.embed_tokens.weight.grad(&grads).unwrap()),
        ),
        (
            "norm",
            to_vec(model.model.norm.weight.grad(&grads).unwrap()),
        ),
        (
            "down_proj",
            to_vec(
                model.model.layers[1]
                    .mlp
                    .down_proj
                    .weight
                    .grad(&grads)
                    .unwrap(),
            ),
        ),
    ];
    if let Some(head) = &model.lm_head {
        match head.weight.grad(&grads) {
            Some(g) => out.push(("lm_head", to_vec(g))),
            None => assert!(frozen_head, "the head took no gradient"),
        }
    }
    out
}

/// The worst relative difference between two runs, compared name by name.
fn compare(what: &str, a: Vec<(&'static str, Vec<f32>)>, b: Vec<(&'static str, Vec<f32>)>) {
    assert_eq!(a.len(), b.len(), "{what}: the same gradients");
    for ((name, a), (other, b)) in a.into_iter().zip(b) {
        assert_eq!(name, other);
        assert_eq!(a.len(), b.len(), "{name} ({what})");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 2e-5, "{name} ({what}): worst difference {worst}");
    }
}

#[test]
fn mean_nll_gives_the_whole_logits_cross_entropy_and_gradients() {
    assert!(
        fused::chunked_head(),
        "the chunked head is off: this would compare nothing"
    );
    for (tied, frozen) in [(false, false), (true, false), (false, true)] {
        let want = run(tied, frozen, Path::WholeMean);
        assert_eq!(want.len(), if tied || frozen { 4 } else { 5 });
        let what = format!("tied {tied}, frozen head {frozen}");
        compare(&what, run(tied, frozen, Path::MeanNll), want);
    }
}

#[test]
fn chunked_head_gives_the_whole_logits_values_and_gradients() {
    // Before anything reads the budget: every target_logprobs call chunks.
    std::env::set_var("KILN_LOGITS_MB", "0");
    assert!(
        fused::enabled(),
        "the fused kernels are off: nothing would be chunked"
    );
    assert_eq!(fused::logits_budget(), 0);
    for (tied, frozen) in [(false, false), (true, false), (false, true)] {
        let want = run(tied, frozen, Path::Whole);
        assert_eq!(want.len(), if tied || frozen { 4 } else { 5 });
        let what = format!("tied {tied}, frozen head {frozen}");
        compare(&what, run(tied, frozen, Path::Chunked), want);
    }
}
