//! Supervised fine-tuning (Ouyang et al. 2022, stage 1): the model learns to answer prompts the
//! way the demonstrations do. Conversations are rendered with the model's chat template, the
//! loss covers assistant tokens only (each assistant turn ends with EOS, so the model learns to
//! stop), and batches group conversations of similar length (length-bucketed), each packed
//! without its padding ([`kiln_model::Packing`]) for the forward pass.
//!
//! Evaluation: held-out loss, and exact-match accuracy of greedy answers to held-out prompts
//! (with the gold reward when the data comes from the built-in world).

use kiln_data::chat::Turn;
use kiln_data::world::World;
use kiln_engine::SamplingParams;
use kiln_eval::answers::{answer_prompts, to_messages};
use kiln_eval::gold_eval;
use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::{Int, Tensor, TensorData};
use kiln_model::Llama;
use kiln_tokenizer::Tokenizer;

use crate::perf::FlopCount;
use crate::stages::LengthBuckets;
use crate::trainer::{backward_halves, Stage, StageGrads};
use crate::{TrainConfig, TrainError};

/// A tokenized conversation: ids and which targets are trained on.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
}

/// Tokenizes conversations, truncating those longer than `max_len` (counted, never silent).
pub fn tokenize(
    tk: &Tokenizer,
    convs: &[Vec<Turn>],
    max_len: usize,
    all_tokens: bool,
) -> Result<(Vec<Example>, usize), TrainError> {
    let mut out = Vec::with_capacity(convs.len());
    let mut truncated = 0;
    for c in convs {
        let ct = tk.encode_chat(&to_messages(c))?;
        let (mut ids, mut mask) = (ct.ids, ct.assistant);
        if all_tokens {
            mask.iter_mut().for_each(|m| *m = true);
        }
        if ids.len() > max_len {
            truncated += 1;
            ids.truncate(max_len);
            mask.truncate(max_len);
        }
        // Nothing to learn from a conversation whose answers were all cut off.
        if mask.iter().skip(1).any(|&m| m) {
            out.push(Example { ids, mask });
        }
    }
    Ok((out, truncated))
}

/// Loss of next-token prediction over the masked targets of a batch of examples.
///
/// The language-model head runs only at the positions whose next token is a target (the
/// responses), not at prompt or padding positions: on the built-in world that skips most of the
/// head's FLOPs and its vocabulary-wide softmax.
pub fn masked_loss(model: &Llama, batch: &[&Example]) -> (Tensor<1>, usize) {
    let device = model.device();
    let t = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let b = batch.len();
    let mut rows = Vec::with_capacity(b);
    let mut valid = Vec::with_capacity(b);
    // (row, column) of the positions that predict a target, and the targets.
    let mut at = Vec::new();
    let mut targets = Vec::new();
    for (i, e) in batch.iter().enumerate() {
        let len = e.ids.len();
        let mut row = e.ids.clone();
        row.resize(t, 0);
        valid.push((0..t).map(|j| j < len).collect::<Vec<_>>());
        for j in 1..len {
            if e.mask[j] {
                at.push((i, j - 1));
                targets.push(e.ids[j] as i64);
            }
        }
        rows.push(row);
    }
    // The rows packed without their padding ([`kiln_model::Packing`]), as PPO and the reward
    // model run theirs: a length bucket's rows still differ by a few tokens, and short ones may
    // share a row.
    let packing = model.packing(&rows, &valid);
    let n = at.len();
    if n == 0 {
        // No target in the batch: a zero loss that still depends on the parameters.
        return (model.hidden(&packing.input, None).sum() * 0.0, 0);
    }
    let at: Vec<usize> = at.iter().map(|&(i, j)| packing.index(i, j)).collect();
    // The last layer's output projection and feed-forward block run at those positions only.
    let d = model.config.hidden_size;
    let picked = model.hidden_at(&packing.input, &at); // (n, d)
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    (model.mean_nll(picked.reshape([n, d]), targets), n)
}

/// Targets of an example in [`masked_loss`]: the positions whose next token is masked in.
fn targets(e: &Example) -> usize {
    (1..e.ids.len()).filter(|&j| e.mask[j]).count()
}

/// The gradients of [`masked_loss`]` · scale` and its value, from the two halves of `batch`
/// back-propagated side by side ([`backward_halves`]; each half's mean weighted by its share of
/// the targets). `None` when a half has no target (or the batch has one example).
pub fn masked_grads(
    model: &Llama,
    batch: &[&Example],
    scale: f64,
) -> Option<(Vec<GradientsParams>, f64)> {
    let count = |h: &[&Example]| h.iter().map(|e| targets(e)).sum::<usize>();
    backward_halves(model, batch, count, |m, h| masked_loss(m, h).0, scale)
}

pub struct Sft {
    train: Vec<Example>,
    /// Indices of `train` sorted by length, cut into batches (length buckets).
    buckets: LengthBuckets,
    eval: Vec<Example>,
    eval_prompts: Vec<(Vec<Turn>, String)>,
    world: Option<World>,
    tokenizer: Tokenizer,
    batch: usize,
    accum: usize,
    eval_batches: usize,
    answer_tokens: usize,
}

impl Sft {
    /// `eval_convs`: held-out conversations; their last assistant turn is the reference answer
    /// for exact match. `world`: score answers with the gold reward too.
    pub fn new(
        tokenizer: &Tokenizer,
        train: &[Vec<Turn>],
        eval_convs: &[Vec<Turn>],
        world: Option<World>,
        config: &TrainConfig,
        all_tokens: bool,
    ) -> Result<(Self, usize), TrainError> {
        let max_len = config.data.seq_len;
        let (train_ex, truncated) = tokenize(tokenizer, train, max_len, all_tokens)?;
        if train_ex.is_empty() {
            return Err(TrainError::Config(
                "no SFT example has an assistant token within data.seq_len".into(),
            ));
        }
        let (eval_ex, _) = tokenize(tokenizer, eval_convs, max_len, all_tokens)?;
        let lens: Vec<usize> = train_ex.iter().map(|e| e.ids.len()).collect();
        let buckets = LengthBuckets::new(&lens, config.data.batch_size, config.seed);
        let n_prompts = (config.eval.batches * config.data.batch_size).max(1);
        let eval_prompts = eval_convs
            .iter()
            .filter_map(|c| {
                let last = c.iter().rposition(|t| t.role == "assistant")?;
                Some((c[..last].to_vec(), c[last].content.trim().to_string()))
            })
            .take(n_prompts)
            .collect();
        Ok((
            Sft {
                train: train_ex,
                buckets,
                eval: eval_ex,
                eval_prompts,
                world,
                tokenizer: tokenizer.clone(),
                batch: config.data.batch_size,
                accum: config.optim.grad_accum.max(1),
                eval_batches: config.eval.batches,
                answer_tokens: config.eval.sample_tokens,
            },
            truncated,
        ))
    }

    pub fn len(&self) -> usize {
        self.train.len()
    }

    pub fn is_empty(&self) -> bool {
        self.train.is_empty()
    }
}

impl Sft {
    /// Micro-batch `micro` of step `step`: consecutive buckets of the epoch's order.
    fn batch_of(&self, step: usize, micro: usize) -> Vec<&Example> {
        let k = step * self.accum + micro;
        self.buckets
            .get(k)
            .iter()
            .map(|&i| &self.train[i])
            .collect()
    }
}

/// Throughput counts every token processed, as TRL reports it.
fn tokens_of(batch: &[&Example]) -> usize {
    batch.iter().map(|e| e.ids.len()).sum()
}

impl Stage<Llama> for Sft {
    fn train_loss(
        &mut self,
        model: &Llama,
        step: usize,
        micro: usize,
    ) -> Result<(Tensor<1>, usize), TrainError> {
        let batch = self.batch_of(step, micro);
        let (loss, _) = masked_loss(model, &batch);
        Ok((loss, tokens_of(&batch)))
    }

    fn train_grads(
        &mut self,
        model: &Llama,
        step: usize,
        micro: usize,
        scale: f64,
    ) -> Result<Option<StageGrads>, TrainError> {
        // At bf16 precision the batch goes whole (the trainer back-propagates `train_loss`):
        // SFT's halves are small (the bench's: about 500 tokens each), and side by side they
        // measured 25-36% slower than one batch for full fine-tuning and 10-14% for LoRA (Zen 4,
        // `kiln bench --what stages --precision bf16`, alternating), where at f32 they were even
        // (full) and 14% faster (LoRA), and the reward stage's halves (about twice the tokens)
        // 7% (f32) and 15% (bf16) faster.
        if kiln_model::fused::bf16_active() {
            return Ok(None);
        }
        let batch = self.batch_of(step, micro);
        Ok(masked_grads(model, &batch, scale).map(|g| StageGrads::of(g, tokens_of(&batch))))
    }

    fn flops(&mut self, count: &FlopCount, step: usize, micro: usize) -> Option<f64> {
        // The last layer and the head run at the target positions only (`masked_loss`).
        let batch = self.batch_of(step, micro);
        let rows = batch.iter().map(|e| (e.ids.len(), targets(e)));
        Some(count.rows(rows, count.vocab, true))
    }

    fn evaluate(&mut self, model: &Llama) -> Result<Vec<(String, f64)>, TrainError> {
        let mut metrics = Vec::new();
        let (mut sum, mut count) = (0.0f64, 0usize);
        for chunk in self
            .eval
            .chunks(self.batch.max(1))
            .take(self.eval_batches.max(1))
        {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (loss, n) = masked_loss(model, &refs);
            sum += kiln_model::to_vec(loss)[0] as f64 * n as f64;
            count += n;
        }
        metrics.push(("val_loss".to_string(), sum / count.max(1) as f64));
        if !self.eval_prompts.is_empty() {
            let prompts: Vec<Vec<Turn>> =
                self.eval_prompts.iter().map(|(p, _)| p.clone()).collect();
            match &self.world {
                Some(world) => {
                    let r = gold_eval(
                        model,
                        &self.tokenizer,
                        world,
                        &prompts,
                        self.answer_tokens,
                        32,
                    )?;
                    metrics.push(("exact_match".into(), r.exact_match.mean));
                    metrics.push(("correct".into(), r.correct.mean));
                    metrics.push(("gold_reward".into(), r.gold_reward.mean));
                }
                None => {
                    let answers = answer_prompts(
                        model,
                        &self.tokenizer,
                        &prompts,
                        &SamplingParams::greedy(self.answer_tokens),
                        32,
                    )?;
                    let hits = answers
                        .iter()
                        .zip(&self.eval_prompts)
                        .filter(|((a, _), (_, r))| a == r)
                        .count();
                    metrics.push((
                        "exact_match".into(),
                        hits as f64 / answers.len().max(1) as f64,
                    ));
                }
            }
        }
        Ok(metrics)
    }

    fn samples(&mut self, model: &Llama) -> Result<Vec<String>, TrainError> {
        let prompts: Vec<Vec<Turn>> = self
            .eval_prompts
            .iter()
            .take(2)
            .map(|(p, _)| p.clone())
            .collect();
        let answers = answer_prompts(
            model,
            &self.tokenizer,
            &prompts,
            &SamplingParams::greedy(self.answer_tokens),
            8,
        )?;
        Ok(prompts
            .iter()
            .zip(answers)
            .map(|(p, (a, _))| format!("{} -> {a}", p.last().map_or("", |t| t.content.as_str())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::{cross_entropy, default_device, ForwardInput, LlamaConfig};

    /// The head at target positions only gives the loss (and gradient) of full logits weighted by
    /// the target mask.
    #[test]
    fn masked_loss_equals_full_logits_with_weights() {
        let device = default_device().autodiff();
        let config = LlamaConfig::new(50, 32, 64, 2, 4, 2, 64);
        let model = Llama::init(&config, 3, &device).unwrap();
        let ex = [
            Example {
                ids: vec![1, 5, 7, 9, 11, 2],
                mask: vec![false, false, false, true, true, true],
            },
            Example {
                ids: vec![1, 8, 3, 4],
                mask: vec![false, false, true, true],
            },
        ];
        let batch: Vec<&Example> = ex.iter().collect();
        let (loss, n) = masked_loss(&model, &batch);
        assert_eq!(n, 5);
        // The same loss from full logits: rows padded to 6, targets shifted by one.
        let rows = vec![ex[0].ids.clone(), vec![1, 8, 3, 4, 0, 0]];
        let valid = vec![vec![true; 6], vec![true, true, true, true, false, false]];
        let logits = model.forward(&ForwardInput::padded(&rows, &valid, &device), None);
        let logits = logits.slice([0..2, 0..5, 0..50]);
        let targets = vec![5i64, 7, 9, 11, 2, 8, 3, 4, 0, 0];
        let w = vec![0f32, 0., 1., 1., 1., 0., 1., 1., 0., 0.];
        let want = cross_entropy(
            logits,
            Tensor::<2, Int>::from_data(TensorData::new(targets, [2, 5]), &device),
            Tensor::from_data(TensorData::new(w, [2, 5]), &device),
        );
        let (a, b) = (
            kiln_model::to_vec(loss.clone())[0],
            kiln_model::to_vec(want.clone())[0],
        );
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        let ga = loss.backward();
        let gb = want.backward();
        let wq = model.model.layers[0].self_attn.q_proj.weight.val();
        let (x, y) = (
            kiln_model::to_vec(wq.grad(&ga).unwrap()),
            kiln_model::to_vec(wq.grad(&gb).unwrap()),
        );
        let worst = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "gradients differ by {worst}");
    }
}
