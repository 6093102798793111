//! The stages' loss back-propagated as two halves side by side (`trainer::backward_pair`, the
//! second half on a twin of the model) gives the gradients of the whole loss, parameter by
//! parameter, and its value: pre-training, SFT (full and LoRA) and the reward model.

use kiln_model::burn::module::{Module, ModuleVisitor, Param};
use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::Tensor;
use kiln_model::reward::RewardModel;
use kiln_model::{default_device, Llama, LlamaConfig};
use kiln_train::stages::pretrain::{lm_grads, lm_loss};
use kiln_train::stages::reward::{bt_loss, pair_grads, score_pairs, TokPair};
use kiln_train::stages::sft::{masked_grads, masked_loss, Example};

/// Each parameter's gradient in `joint` against the sum of its gradients in `parts`; returns
/// how many parameters had one (every parameter with a gradient in one has it in the other).
fn compare<M: Module>(model: &M, joint: &GradientsParams, parts: &[GradientsParams]) -> usize {
    struct Compare<'a> {
        joint: &'a GradientsParams,
        parts: &'a [GradientsParams],
        params: usize,
    }
    impl ModuleVisitor for Compare<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let got: Vec<Vec<f32>> = self
                .parts
                .iter()
                .filter_map(|g| g.get::<D>(param.id))
                .map(kiln_model::to_vec)
                .collect();
            let Some(want) = self.joint.get::<D>(param.id) else {
                assert!(got.is_empty(), "a gradient the whole loss does not have");
                return;
            };
            let want = kiln_model::to_vec(want);
            assert!(!got.is_empty(), "a gradient missing from the parts");
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            for (i, w) in want.iter().enumerate() {
                let g: f32 = got.iter().map(|p| p[i]).sum();
                assert!(
                    (g - w).abs() <= 1e-4 * scale,
                    "parameter {:?}[{i}]: halves {g}, whole {w}",
                    param.id
                );
            }
            self.params += 1;
        }
    }
    let mut c = Compare {
        joint,
        parts,
        params: 0,
    };
    model.visit(&mut c);
    c.params
}

fn config() -> LlamaConfig {
    LlamaConfig::new(61, 32, 48, 2, 4, 2, 64)
}

fn rows(n: usize, len: impl Fn(usize) -> usize, seed: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..len(i))
                .map(|t| ((i * 37 + t * 11 + seed) % 61) as u32)
                .collect()
        })
        .collect()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
}

#[test]
fn pretraining_halves_give_the_whole_gradient() {
    let model = Llama::init(&config(), 1, &default_device().autodiff()).unwrap();
    // Five windows: halves of two and three, weighted by their share of the rows.
    let windows = rows(5, |_| 17, 0);
    let loss = lm_loss(&model, &windows) * 0.5;
    let value = kiln_model::to_vec(loss.clone())[0] as f64;
    let joint = GradientsParams::from_grads(loss.backward(), &model);
    let (parts, v) = lm_grads(&model, &windows, 0.5).unwrap();
    close(value, v);
    assert!(compare(&model, &joint, &parts) > 0);
    assert!(lm_grads(&model, &windows[..1], 1.0).is_none());
}

#[test]
fn sft_halves_give_the_whole_gradient_full_and_lora() {
    let base = Llama::init(&config(), 2, &default_device().autodiff()).unwrap();
    let lora = kiln_model::peft::apply(
        base.clone(),
        &kiln_model::peft::PeftConfig {
            method: "lora".into(),
            ..Default::default()
        },
        std::path::Path::new("."),
        3,
    )
    .unwrap();
    // Examples of different lengths and different numbers of targets: the halves' means are
    // weighted by their targets, not their examples.
    let ids = rows(6, |i| 9 + 3 * i, 5);
    let examples: Vec<Example> = ids
        .into_iter()
        .enumerate()
        .map(|(i, ids)| {
            let mask = (0..ids.len()).map(|t| t >= 4 + i).collect();
            Example { ids, mask }
        })
        .collect();
    let batch: Vec<&Example> = examples.iter().collect();
    for model in [base, lora] {
        let (loss, _) = masked_loss(&model, &batch);
        let value = kiln_model::to_vec(loss.clone())[0] as f64;
        let joint = GradientsParams::from_grads(loss.backward(), &model);
        let (parts, v) = masked_grads(&model, &batch, 1.0).unwrap();
        close(value, v);
        assert!(compare(&model, &joint, &parts) > 0);
    }
}

#[test]
fn reward_halves_give_the_whole_gradient() {
    let device = default_device().autodiff();
    let model = RewardModel::from_llama(Llama::init(&config(), 4, &device).unwrap(), 5);
    let chosen = rows(5, |i| 8 + i, 1);
    let rejected = rows(5, |i| 12 - i, 2);
    let pairs: Vec<TokPair> = chosen
        .into_iter()
        .zip(rejected)
        .map(|(chosen, rejected)| TokPair {
            chosen,
            rejected,
            gold: None,
            factor: None,
        })
        .collect();
    let refs: Vec<&TokPair> = pairs.iter().collect();
    // With the centering term, a mean over pairs too.
    let (c, r) = score_pairs(&model, &refs);
    let loss = bt_loss(c, r, 0.1, 0.01);
    let value = kiln_model::to_vec(loss.clone())[0] as f64;
    let joint = GradientsParams::from_grads(loss.backward(), &model);
    let (parts, v) = pair_grads(&model, &refs, 0.1, 0.01, 1.0).unwrap();
    close(value, v);
    assert!(compare(&model, &joint, &parts) > 0);
}
