//! The stages' loss back-propagated as two halves side by side (`trainer::backward_pair`, the
//! second half on a twin of the model) gives the gradients of the whole loss, parameter by
//! parameter, and its value: pre-training, SFT (full and LoRA) and the reward model.

use kiln_model::burn::module::Module;
use kiln_model::burn::optim::GradientsParams;
use kiln_model::reward::RewardModel;
use kiln_model::{default_device, Llama, LlamaConfig};
use kiln_train::stages::pretrain::{lm_grads, lm_loss};
use kiln_train::stages::reward::{bt_loss, pair_grads, score_pairs, TokPair};
use kiln_train::stages::sft::{masked_grads, masked_loss, Example};

mod grads;

/// Every gradient of the whole loss against the parts' sum: within 1e-4 of each parameter's
/// largest; returns how many parameters had one.
fn compare<M: Module>(model: &M, joint: &GradientsParams, parts: &[GradientsParams]) -> usize {
    let c = grads::compare(model, joint, parts);
    assert!(
        c.worst_of_largest <= 1e-4,
        "halves off the whole by {} of the largest gradient",
        c.worst_of_largest
    );
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
