//! Reward modeling (Ouyang et al. 2022, stage 2): a scalar head on the SFT model learns from
//! preference pairs that the chosen answer scores higher. Loss: Bradley–Terry,
//! −log σ(r_chosen − r_rejected − margin), plus an optional centering penalty
//! λ·(r_chosen + r_rejected)² that keeps scores near zero (Eisenstein et al. 2023). Chosen and
//! rejected are scored in one batch.
//!
//! Evaluation on held-out pairs: accuracy, mean margin, loss, reward mean/std, accuracy by margin
//! bucket (calibration), and on the built-in world agreement with the gold reward.

use kiln_data::chat::{PrefPair, Turn};
use kiln_data::world::{gold_reward, Task, World};
use kiln_eval::answers::to_messages;
use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::activation::log_sigmoid;
use kiln_model::burn::tensor::Tensor;
use kiln_model::reward::RewardModel;
use kiln_tokenizer::Tokenizer;

use crate::perf::FlopCount;
use crate::stages::LengthBuckets;
use crate::trainer::{backward_halves, Stage, StageGrads, TrainModel};
use crate::{TrainConfig, TrainError};

impl TrainModel for RewardModel {
    fn save_dir(&self, tokenizer: &Tokenizer, dir: &std::path::Path) -> Result<(), TrainError> {
        self.save(dir)?;
        tokenizer.save(dir, Some(self.base.config.max_position_embeddings))?;
        Ok(())
    }
    fn load_dir(
        dir: &std::path::Path,
        device: &kiln_model::burn::tensor::Device,
    ) -> Result<Self, TrainError> {
        Ok(RewardModel::load_for_training(dir, device)?)
    }
    fn llama_config(&self) -> &kiln_model::LlamaConfig {
        &self.base.config
    }
    fn restore_trainable(
        mut self,
        peft: &kiln_model::peft::PeftConfig,
    ) -> Result<Self, TrainError> {
        self.base = kiln_model::peft::set_trainable(self.base, peft)?;
        Ok(self)
    }
}

/// Bradley–Terry loss of chosen/rejected scores `(B,)`, with margin and centering coefficient.
pub fn bt_loss(chosen: Tensor<1>, rejected: Tensor<1>, margin: f64, center: f64) -> Tensor<1> {
    let diff = chosen.clone() - rejected.clone() - margin;
    let loss = log_sigmoid(diff).neg().mean();
    if center > 0.0 {
        loss + (chosen + rejected).square().mean() * center
    } else {
        loss
    }
}

/// The gradients of [`bt_loss`] over `pairs` (times `scale`) and its value, from the two halves
/// of the pairs back-propagated side by side ([`backward_halves`]; both of its terms are means over
/// pairs, so each half is weighted by its share of them). `None` for fewer than two pairs.
pub fn pair_grads(
    model: &RewardModel,
    pairs: &[&TokPair],
    margin: f64,
    center: f64,
    scale: f64,
) -> Option<(Vec<GradientsParams>, f64)> {
    let loss = |m: &RewardModel, h: &[&TokPair]| {
        let (c, r) = score_pairs(m, h);
        bt_loss(c, r, margin, center)
    };
    backward_halves(model, pairs, <[_]>::len, loss, scale)
}

/// A tokenized pair: (prompt + chosen, prompt + rejected), and the world task when known.
pub struct TokPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub gold: Option<(f64, f64)>,
    /// What separates the pair under the gold reward: `correct`, `tone` or `length`.
    pub factor: Option<&'static str>,
}

/// Tokens of a prompt and its answer through the chat template.
pub fn encode_answer(
    tk: &Tokenizer,
    prompt: &[Turn],
    answer: &str,
) -> Result<Vec<u32>, TrainError> {
    let mut turns = prompt.to_vec();
    turns.push(Turn::new("assistant", answer));
    Ok(tk.encode_chat(&to_messages(&turns))?.ids)
}

pub fn tokenize_pairs(
    tk: &Tokenizer,
    pairs: &[PrefPair],
    max_len: usize,
    world: Option<&World>,
) -> Result<(Vec<TokPair>, usize), TrainError> {
    let mut out = Vec::new();
    let mut too_long = 0;
    for p in pairs {
        let (c, r) = (
            encode_answer(tk, &p.prompt, &p.chosen)?,
            encode_answer(tk, &p.prompt, &p.rejected)?,
        );
        if c.len() > max_len || r.len() > max_len {
            too_long += 1;
            continue;
        }
        let scores = world.and_then(|w| {
            let q = &p.prompt.last()?.content;
            let task = Task::parse(w, q)?;
            Some((
                gold_reward(w, &task, &p.chosen),
                gold_reward(w, &task, &p.rejected),
            ))
        });
        let factor = scores.as_ref().map(|(a, b)| {
            if a.correct != b.correct {
                "correct"
            } else if (a.polite, a.rude) != (b.polite, b.rude) {
                "tone"
            } else {
                "length"
            }
        });
        out.push(TokPair {
            chosen: c,
            rejected: r,
            gold: scores.map(|(a, b)| (a.reward, b.reward)),
            factor,
        });
    }
    Ok((out, too_long))
}

/// Scores of chosen and rejected of `pairs`, in one batch.
pub fn score_pairs(model: &RewardModel, pairs: &[&TokPair]) -> (Tensor<1>, Tensor<1>) {
    let b = pairs.len();
    let t = pairs
        .iter()
        .map(|p| p.chosen.len().max(p.rejected.len()))
        .max()
        .unwrap_or(1);
    let mut rows = Vec::with_capacity(2 * b);
    let mut valid = Vec::with_capacity(2 * b);
    for seq in pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
    {
        let mut r = seq.clone();
        r.resize(t, 0);
        rows.push(r);
        valid.push((0..t).map(|j| j < seq.len()).collect::<Vec<_>>());
    }
    let s = model.forward(&rows, &valid);
    (s.clone().narrow(0, 0, b), s.narrow(0, b, b))
}

pub struct RewardStage {
    train: Vec<TokPair>,
    eval: Vec<TokPair>,
    /// Training pairs grouped by length (the longer side), batches of similar length.
    buckets: LengthBuckets,
    batch: usize,
    accum: usize,
    pub margin: f64,
    pub center: f64,
}

impl RewardStage {
    pub fn new(
        train: Vec<TokPair>,
        eval: Vec<TokPair>,
        config: &TrainConfig,
        margin: f64,
        center: f64,
    ) -> Self {
        let lens: Vec<usize> = train
            .iter()
            .map(|p| p.chosen.len().max(p.rejected.len()))
            .collect();
        RewardStage {
            buckets: LengthBuckets::new(&lens, config.data.batch_size, config.seed),
            train,
            eval,
            batch: config.data.batch_size,
            accum: config.optim.grad_accum.max(1),
            margin,
            center,
        }
    }
}

/// Held-out metrics of a reward model on tokenized pairs.
pub fn pair_metrics(
    model: &RewardModel,
    pairs: &[TokPair],
    batch: usize,
    margin: f64,
) -> Vec<(String, f64)> {
    let (mut c, mut r) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&TokPair> = chunk.iter().collect();
        let (sc, sr) = score_pairs(model, &refs);
        c.extend(kiln_model::to_vec(sc));
        r.extend(kiln_model::to_vec(sr));
    }
    let n = c.len().max(1) as f64;
    let diffs: Vec<f64> = c.iter().zip(&r).map(|(a, b)| (*a - *b) as f64).collect();
    let loss = diffs
        .iter()
        .map(|d| {
            let x = d - margin;
            if x > 0.0 {
                (-x).exp().ln_1p()
            } else {
                -x + x.exp().ln_1p()
            }
        })
        .sum::<f64>()
        / n;
    let acc = diffs.iter().filter(|d| **d > 0.0).count() as f64 / n;
    let all: Vec<f64> = c.iter().chain(&r).map(|&x| x as f64).collect();
    let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
    let std =
        (all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len().max(1) as f64).sqrt();
    let mut m = vec![
        ("val_loss".to_string(), loss),
        ("accuracy".into(), acc),
        ("mean_margin".into(), diffs.iter().sum::<f64>() / n),
        ("reward_mean".into(), mean),
        ("reward_std".into(), std),
    ];
    // Calibration: accuracy among pairs whose |margin| falls in each bucket.
    for (lo, hi, name) in [
        (0.0, 0.5, "acc_margin_0_0.5"),
        (0.5, 1.0, "acc_margin_0.5_1"),
        (1.0, 2.0, "acc_margin_1_2"),
        (2.0, f64::INFINITY, "acc_margin_2_inf"),
    ] {
        let sel: Vec<&f64> = diffs
            .iter()
            .filter(|d| d.abs() >= lo && d.abs() < hi)
            .collect();
        if !sel.is_empty() {
            m.push((
                name.into(),
                sel.iter().filter(|d| ***d > 0.0).count() as f64 / sel.len() as f64,
            ));
        }
    }
    // Agreement with the gold reward (built-in world): does the model order the pair as the gold does?
    let gold: Vec<(f64, bool)> = pairs
        .iter()
        .zip(&diffs)
        .filter_map(|(p, d)| p.gold.filter(|(a, b)| a != b).map(|(a, b)| (*d, a > b)))
        .collect();
    if !gold.is_empty() {
        m.push((
            "gold_agreement".into(),
            gold.iter()
                .filter(|(d, chosen_better)| (*d > 0.0) == *chosen_better)
                .count() as f64
                / gold.len() as f64,
        ));
    }
    // The same, split by what separates the pair: knowing the world's facts (correct), the
    // tone, or the length. A small model can learn tone and length long before facts.
    for factor in ["correct", "tone", "length"] {
        let sel: Vec<bool> = pairs
            .iter()
            .zip(&diffs)
            .filter(|(p, _)| p.factor == Some(factor))
            .filter_map(|(p, d)| {
                p.gold
                    .filter(|(a, b)| a != b)
                    .map(|(a, b)| (*d > 0.0) == (a > b))
            })
            .collect();
        if !sel.is_empty() {
            m.push((
                format!("gold_agreement_{factor}"),
                sel.iter().filter(|&&x| x).count() as f64 / sel.len() as f64,
            ));
        }
    }
    m
}

impl RewardStage {
    /// The pairs of micro-batch `micro` of step `step` and their tokens (both sides).
    fn pairs_of(&self, step: usize, micro: usize) -> (Vec<&TokPair>, usize) {
        let idx = self.buckets.get(step * self.accum + micro);
        let pairs: Vec<&TokPair> = idx.iter().map(|&i| &self.train[i]).collect();
        let tokens = pairs
            .iter()
            .map(|p| p.chosen.len() + p.rejected.len())
            .sum();
        (pairs, tokens)
    }
}

impl Stage<RewardModel> for RewardStage {
    fn train_loss(
        &mut self,
        model: &RewardModel,
        step: usize,
        micro: usize,
    ) -> Result<(Tensor<1>, usize), TrainError> {
        let (pairs, tokens) = self.pairs_of(step, micro);
        let (c, r) = score_pairs(model, &pairs);
        Ok((bt_loss(c, r, self.margin, self.center), tokens))
    }

    fn train_grads(
        &mut self,
        model: &RewardModel,
        step: usize,
        micro: usize,
        scale: f64,
    ) -> Result<Option<StageGrads>, TrainError> {
        let (pairs, tokens) = self.pairs_of(step, micro);
        let (margin, center) = (self.margin, self.center);
        Ok(pair_grads(model, &pairs, margin, center, scale).map(|g| StageGrads::of(g, tokens)))
    }

    fn flops(&mut self, count: &FlopCount, step: usize, micro: usize) -> Option<f64> {
        // Each side of a pair: its last token through the last layer into the score head.
        let (pairs, _) = self.pairs_of(step, micro);
        let rows = pairs
            .iter()
            .flat_map(|p| [(p.chosen.len(), 1), (p.rejected.len(), 1)]);
        Some(count.rows(rows, 1, true))
    }

    fn evaluate(&mut self, model: &RewardModel) -> Result<Vec<(String, f64)>, TrainError> {
        Ok(pair_metrics(model, &self.eval, self.batch, self.margin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::burn::tensor::TensorData;
    use kiln_model::default_device;

    #[test]
    fn loss_equals_the_formula_on_hand_made_scores() {
        let d = default_device();
        let c = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 0.5, -2.0], [3]), &d);
        let r = Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 1.5, -1.0], [3]), &d);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let expect = |m: f64, lam: f64| {
            let pairs = [(1.0, 0.0), (0.5, 1.5), (-2.0, -1.0)];
            pairs
                .iter()
                .map(|(a, b): &(f64, f64)| -sig(a - b - m).ln() + lam * (a + b).powi(2))
                .sum::<f64>()
                / 3.0
        };
        for (m, lam) in [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (0.25, 0.1)] {
            let got = kiln_model::to_vec(bt_loss(c.clone(), r.clone(), m, lam))[0] as f64;
            assert!(
                (got - expect(m, lam)).abs() < 1e-6,
                "margin {m}, center {lam}: {got} vs {}",
                expect(m, lam)
            );
        }
    }
}
