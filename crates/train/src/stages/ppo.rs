//! Reinforcement learning from human feedback with PPO (Schulman et al. 2017; Ziegler et al.
//! 2019; Ouyang et al. 2022, PPO-ptx).
//!
//! Each iteration: sample prompts; generate answers with the KV-cache engine (temperature 1,
//! stop at EOS or the token limit); recompute the policy's log-probabilities of those answers
//! with the same batched forward pass the update uses (so the first ratio is exactly 1; or, with
//! `ppo.old_logprobs = "generation"`, take the sampler's, as TRL does), the
//! frozen reference's, the critic's values and the reward model's score; per-token reward
//! −β·(log π − log π_ref) with the score added at the last token; GAE advantages, whitened.
//! Then `epochs` passes over `minibatches` of: clipped surrogate + clipped value loss − entropy
//! bonus + γ_ptx × language-modeling loss on pre-training data. β adapts toward a target KL.
//!
//! Four models: the policy and the critic (initialized from the reward model, as InstructGPT)
//! are trained together as one [`ActorCritic`]; the reference and the reward model are frozen.

use std::path::Path;

use kiln_data::chat::Turn;
use kiln_data::shards::Shard;
use kiln_data::world::{gold_reward, Task, World};
use kiln_engine::{generate, SamplingParams};
use kiln_eval::answers::{answer_prompts, to_messages};
use kiln_eval::MeanCi;
use kiln_model::burn::module::Module;
use kiln_model::burn::nn::Linear;
use kiln_model::burn::optim::GradientsParams;
use kiln_model::burn::tensor::activation::log_softmax;
use kiln_model::burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_model::reward::RewardModel;
use kiln_model::{ForwardInput, Llama, ModelDir};
use kiln_tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::{OldLogprobs, PpoSection};
use crate::perf::FlopCount;
use crate::trainer::{backward_both, Stage, StageGrads, TrainModel};
use crate::TrainError;

/// The trained pair: the policy and its critic. The critic is either a separate model
/// initialized from the reward model (InstructGPT; `ppo.critic = "reward_model"`) or a scalar
/// value head on the policy's own hidden states (`"policy_head"`, as TRL's
/// `AutoModelForCausalLMWithValueHead`): one body, less memory, values and log-probabilities
/// from one forward pass.
#[derive(Module, Debug)]
pub struct ActorCritic {
    pub policy: Llama,
    pub critic: Option<RewardModel>,
    /// `[d, 1]`, zero at start (values start at 0).
    pub value_head: Option<Linear>,
}

/// Where a policy-head critic's weights are saved in a PPO output directory.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

impl ActorCritic {
    /// The InstructGPT pair: the critic starts from the reward model.
    pub fn with_critic(policy: Llama, critic: RewardModel) -> Self {
        ActorCritic {
            policy,
            critic: Some(critic),
            value_head: None,
        }
    }

    /// A value head on the policy, zero-initialized.
    pub fn with_value_head(policy: Llama) -> Self {
        let d = policy.config.hidden_size;
        let device = policy.device();
        ActorCritic {
            value_head: Some(kiln_model::layers::linear(
                Tensor::zeros([d, 1], &device),
                None,
            )),
            policy,
            critic: None,
        }
    }

    /// Log-probabilities of the answer tokens `(B, R)`, their distributions ([`AnswerDist`]),
    /// and the critic's values at the positions that emit them `(B, R)`.
    pub fn logprobs_and_values(
        &self,
        rows: &[Vec<u32>],
        valid: &[Vec<bool>],
        p: usize,
        r: usize,
    ) -> (Tensor<2>, AnswerDist, Tensor<2>) {
        match (&self.critic, &self.value_head) {
            (Some(critic), _) => {
                let (lp, logits) = answer_logprobs(&self.policy, rows, valid, p, r);
                (lp, logits, answer_values(critic, rows, valid, p, r))
            }
            (None, Some(head)) => {
                let b = rows.len();
                let hidden = answer_hidden(&self.policy, rows, valid, p, r, true);
                let values = head.forward(hidden.clone()).reshape([b, r]);
                let (lp, logits) = gather_answer(&self.policy, hidden, rows, p, r);
                (lp, logits, values)
            }
            (None, None) => unreachable!("an ActorCritic has a critic or a value head"),
        }
    }
}

impl TrainModel for ActorCritic {
    fn save_dir(&self, tokenizer: &Tokenizer, dir: &Path) -> Result<(), TrainError> {
        ModelDir::save(&self.policy, tokenizer, dir)?;
        if let Some(critic) = &self.critic {
            critic.save_dir(tokenizer, &dir.join("critic"))?;
        }
        if let Some(head) = &self.value_head {
            let d = self.policy.config.hidden_size;
            let w = kiln_model::to_vec(head.weight.val());
            kiln_model::checkpoint::write_atomic(
                &dir.join(VALUE_HEAD_FILE),
                &kiln_model::checkpoint::safetensors_bytes(&[(
                    "v_head.summary.weight".into(),
                    vec![1, d],
                    w,
                )]),
            )?;
        }
        Ok(())
    }
    fn load_dir(dir: &Path, device: &Device) -> Result<Self, TrainError> {
        let policy = kiln_model::adapter_dir::load_any(dir, device)?;
        let head_path = dir.join(VALUE_HEAD_FILE);
        if head_path.exists() {
            let d = policy.config.hidden_size;
            let mut f = kiln_model::checkpoint::TensorFile::read(&head_path)?;
            let w = f.take("v_head.summary.weight", &[1, d])?;
            let mut ac = ActorCritic::with_value_head(policy);
            ac.value_head = Some(kiln_model::layers::linear(
                Tensor::from_data(TensorData::new(w, [d, 1]), device),
                None,
            ));
            return Ok(ac);
        }
        Ok(ActorCritic::with_critic(
            policy,
            RewardModel::load_for_training(&dir.join("critic"), device)?,
        ))
    }
    fn llama_config(&self) -> &kiln_model::LlamaConfig {
        &self.policy.config
    }
    fn restore_trainable(self, peft: &kiln_model::peft::PeftConfig) -> Result<Self, TrainError> {
        // PEFT applies to the policy; the critic (from the reward model) trains in full.
        Ok(ActorCritic {
            policy: self.policy.restore_trainable(peft)?,
            critic: self.critic,
            value_head: self.value_head,
        })
    }
}

// ---- the pieces, as pure functions (unit-tested on fixed values) ----

/// Per-token KL estimate log π(a|s) − log π_ref(a|s) (the k1 estimator of Schulman 2020).
pub fn kl_per_token(logp: &[f32], ref_logp: &[f32]) -> Vec<f64> {
    logp.iter()
        .zip(ref_logp)
        .map(|(a, b)| (*a - *b) as f64)
        .collect()
}

/// Generalized advantage estimation (Schulman et al. 2016) over one answer: returns
/// (advantages, returns). The value after the last token is 0 (the episode ends).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        last = delta + gamma * lam * last;
        adv[t] = last;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// (x − mean) / std over all values (std with a small floor).
pub fn whiten(xs: &mut [f64]) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt().max(1e-8);
    xs.iter_mut().for_each(|x| *x = (*x - mean) / std);
}

/// Ziegler et al.'s adaptive KL controller.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KlController {
    pub beta: f64,
    pub target: f64,
    pub horizon: f64,
    pub adaptive: bool,
}

impl KlController {
    /// β ← β · (1 + clip(KL/target − 1, ±0.2) · n / horizon).
    pub fn update(&mut self, kl: f64, n_steps: usize) {
        if self.adaptive {
            let error = (kl / self.target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + error * n_steps as f64 / self.horizon;
        }
    }
}

fn masked_mean<const D: usize>(x: Tensor<D>, mask: Tensor<D>) -> Tensor<1> {
    (x * mask.clone()).sum() / mask.sum().clamp_min(1.0)
}

/// The clipped surrogate loss: mean over masked tokens of max(−A·r, −A·clip(r, 1±ε)).
pub fn policy_loss(
    logp: Tensor<2>,
    old_logp: Tensor<2>,
    adv: Tensor<2>,
    mask: Tensor<2>,
    clip: f64,
) -> Tensor<1> {
    let ratio = (logp - old_logp).exp();
    let a = adv.neg();
    let pg1 = a.clone() * ratio.clone();
    let pg2 = a * ratio.clamp(1.0 - clip, 1.0 + clip);
    masked_mean(pg1.max_pair(pg2), mask)
}

/// The clipped value loss: ½ · mean of max((v − R)², (v_old + clip(v − v_old, ±c) − R)²).
pub fn value_loss(
    v: Tensor<2>,
    v_old: Tensor<2>,
    ret: Tensor<2>,
    mask: Tensor<2>,
    clip: f64,
) -> Tensor<1> {
    let clipped = v_old.clone() + (v.clone() - v_old).clamp(-clip, clip);
    let l1 = (v - ret.clone()).square();
    let l2 = (clipped - ret).square();
    masked_mean(l1.max_pair(l2), mask) * 0.5
}

// ---- rollouts ----

/// One iteration's experience, padded: rows are [left-padded prompt | answer | padding].
pub struct Rollout {
    pub rows: Vec<Vec<u32>>,
    pub valid: Vec<Vec<bool>>,
    /// Prompt width P and answer width R: answer token j sits at column P + j.
    pub p: usize,
    pub r: usize,
    pub lens: Vec<usize>,
    pub old_logp: Vec<Vec<f32>>,
    /// log-probabilities the engine reported while sampling.
    pub gen_logp: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub adv: Vec<Vec<f64>>,
    pub ret: Vec<Vec<f64>>,
    pub scores: Vec<f64>,
    pub kl: Vec<f64>,
    pub gold: Vec<f64>,
}

/// What the policy's pass keeps of its answer positions' next-token distributions, besides the
/// answer tokens' log-probabilities: what the entropy bonus (or its measurement) reads.
pub enum AnswerDist {
    /// The logits `(B, R, V)`, while they fit [`kiln_model::fused::logits_budget`].
    Logits(Tensor<3>),
    /// Past it, each position's entropy `(B, R)` (differentiable), from the chunked head
    /// ([`Llama::target_logprobs_entropy`]): the logits are never held whole (4 GiB at 16
    /// answers of 512 tokens over a 128k-token vocabulary, and their gradient as much again).
    Entropy(Tensor<2>),
}

/// Policy log-probabilities of the answer tokens of `rows` (columns P..P+R), `(B, R)`, and
/// their distributions.
pub fn answer_logprobs(
    policy: &Llama,
    rows: &[Vec<u32>],
    valid: &[Vec<bool>],
    p: usize,
    r: usize,
) -> (Tensor<2>, AnswerDist) {
    answer_logprobs_with(policy, rows, valid, p, r, true)
}

/// As [`answer_logprobs`]; `peft = false` switches the policy's adapters off (the reference of
/// a LoRA policy).
pub fn answer_logprobs_with(
    policy: &Llama,
    rows: &[Vec<u32>],
    valid: &[Vec<bool>],
    p: usize,
    r: usize,
    peft: bool,
) -> (Tensor<2>, AnswerDist) {
    let hidden = answer_hidden(policy, rows, valid, p, r, peft);
    gather_answer(policy, hidden, rows, p, r)
}

/// `model`'s hidden states at the R columns that emit answer tokens, `(B, R, d)`, from one
/// packed pass ([`kiln_model::Packing`]: the rows without their padding) whose last layer runs
/// its output projection and feed-forward block at those columns only
/// ([`Llama::hidden_at`]); `peft = false` switches its adapters off.
fn answer_hidden(
    model: &Llama,
    rows: &[Vec<u32>],
    valid: &[Vec<bool>],
    p: usize,
    r: usize,
    peft: bool,
) -> Tensor<3> {
    let mut packing = model.packing(rows, valid);
    packing.input.peft = peft;
    let at = packing.columns(p - 1..p - 1 + r);
    let d = model.config.hidden_size;
    model
        .hidden_at(&packing.input, &at)
        .reshape([rows.len(), r, d])
}

/// From the policy's hidden states at the R columns that emit answer tokens, `(B, R, d)`: the
/// log-probabilities of the answer tokens `(B, R)` and their distributions (the logits
/// `(B, R, V)`, or past the logits budget each position's entropy). The language-model head
/// runs on those columns only, not on the prompt (a third of a PPO update's head FLOPs at TRL's
/// benchmark shapes).
pub fn gather_answer(
    policy: &Llama,
    hidden: Tensor<3>,
    rows: &[Vec<u32>],
    p: usize,
    r: usize,
) -> (Tensor<2>, AnswerDist) {
    let [b, _, d] = hidden.dims();
    let targets = answer_targets(rows, p, r, &hidden.device());
    if policy.chunks_logits(b * r) {
        let (lp, ent) = policy.target_logprobs_entropy(hidden.reshape([b * r, d]), targets);
        return (lp.reshape([b, r]), AnswerDist::Entropy(ent.reshape([b, r])));
    }
    let logits = policy.head(hidden); // (B, R, V)
    let lp = kiln_model::token_logprobs(logits.clone(), targets.reshape([b, r]));
    (lp, AnswerDist::Logits(logits))
}

/// The answer tokens of `rows` (columns P..P+R), row-major, `(B · R)`.
fn answer_targets(rows: &[Vec<u32>], p: usize, r: usize, device: &Device) -> Tensor<1, Int> {
    let targets: Vec<i64> = rows
        .iter()
        .flat_map(|row| row[p..p + r].iter().map(|&t| t as i64))
        .collect();
    Tensor::from_data(TensorData::new(targets, [rows.len() * r]), device)
}

/// The log-probabilities of the answer tokens alone, `(B, R)`, for a pass that needs no logits
/// (the reference's, over a whole rollout): past the logits budget the head runs chunk by chunk
/// and the `(B, R, V)` logits are never held ([`Llama::target_logprobs`]; 1 GiB at 64 answers of
/// 32 tokens over a 128k-token vocabulary). Below it, the same values as [`answer_logprobs_with`].
pub fn answer_logprobs_only(
    model: &Llama,
    rows: &[Vec<u32>],
    valid: &[Vec<bool>],
    p: usize,
    r: usize,
    peft: bool,
) -> Tensor<2> {
    let hidden = answer_hidden(model, rows, valid, p, r, peft);
    let [b, _, d] = hidden.dims();
    let targets = answer_targets(rows, p, r, &hidden.device());
    model
        .target_logprobs(hidden.reshape([b * r, d]), targets)
        .reshape([b, r])
}

/// Critic values at the positions that emit each answer token, `(B, R)`.
pub fn answer_values(
    critic: &RewardModel,
    rows: &[Vec<u32>],
    valid: &[Vec<bool>],
    p: usize,
    r: usize,
) -> Tensor<2> {
    let hidden = answer_hidden(&critic.base, rows, valid, p, r, true);
    critic.score.forward(hidden).reshape([rows.len(), r])
}

/// The update's first minibatch's forward pass, recorded while the rollout is scored. The first
/// minibatch of an iteration has the rows of the scoring pass's first chunk (epoch 0 is not
/// shuffled) and the weights it was scored with (nothing has been updated yet), so the scoring
/// pass runs that chunk on the trained (autodiff) models and the update back-propagates through
/// it instead of running the same forward pass again: about a third of one minibatch's work.
pub struct FirstPass {
    iter: usize,
    /// The policy's answer log-probabilities `(B, R)` and distributions; absent when the old
    /// log-probabilities come from the sampler and a separate critic is the only pass.
    policy: Option<(Tensor<2>, AnswerDist)>,
    /// The critic's values `(B, R)`.
    values: Tensor<2>,
}

fn rows_to_host(t: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, r] = t.dims();
    kiln_model::to_vec(t)
        .chunks(r.max(1))
        .map(|c| c.to_vec())
        .collect()
}

pub struct Ppo {
    pub cfg: PpoSection,
    prompts: Vec<Vec<Turn>>,
    eval_prompts: Vec<Vec<Turn>>,
    tokenizer: Tokenizer,
    /// The frozen starting policy; `None` when the policy is trained with PEFT, whose reference
    /// is the policy itself with its adapters switched off (no second copy in memory).
    reference: Option<Llama>,
    reward: RewardModel,
    world: Option<World>,
    ptx: Option<Shard>,
    seed: u64,
    pub kl: KlController,
    rollout: Option<(usize, Rollout)>,
    /// Metrics of the current iteration, reported once per log line.
    pending: Vec<(String, f64)>,
    stats: Vec<(String, f64)>,
    pub rollout_s: f64,
    /// The parts of `rollout_s`: sampling with the KV-cache engine, then scoring (old
    /// log-probabilities, values, reference log-probabilities, reward model).
    pub generate_s: f64,
    pub score_s: f64,
    /// Minibatch forward, backward and optimizer step, summed over the iteration.
    pub update_s: f64,
    update_start: Option<std::time::Instant>,
    /// The first minibatch's forward pass from the last rollout's scoring ([`FirstPass`]).
    first_pass: Option<FirstPass>,
    /// Whether the scoring pass records the first minibatch's forward pass for the update
    /// (default); off, the update runs it again (the same gradients: tested).
    pub reuse_first_pass: bool,
    /// FLOPs of the last minibatch's passes, and of the rollout when it made one ([`Stage::flops`]).
    step_flops: Option<f64>,
}

impl Ppo {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: PpoSection,
        prompts: Vec<Vec<Turn>>,
        eval_prompts: Vec<Vec<Turn>>,
        tokenizer: &Tokenizer,
        reference: Option<Llama>,
        reward: RewardModel,
        world: Option<World>,
        ptx: Option<Shard>,
        seed: u64,
    ) -> Self {
        let kl = KlController {
            beta: cfg.kl_coef,
            target: cfg.target_kl,
            horizon: cfg.kl_horizon,
            adaptive: cfg.adaptive_kl,
        };
        Ppo {
            cfg,
            prompts,
            eval_prompts,
            tokenizer: tokenizer.clone(),
            reference,
            reward,
            world,
            ptx,
            seed,
            kl,
            rollout: None,
            pending: vec![],
            stats: vec![],
            rollout_s: 0.0,
            generate_s: 0.0,
            score_s: 0.0,
            update_s: 0.0,
            update_start: None,
            first_pass: None,
            step_flops: None,
            reuse_first_pass: true,
        }
    }

    /// The iteration whose scoring pass's forward pass is held for its first minibatch
    /// ([`FirstPass`]), if one is.
    pub fn first_pass_iteration(&self) -> Option<usize> {
        self.first_pass.as_ref().map(|f| f.iter)
    }

    pub fn steps_per_iteration(&self) -> usize {
        self.cfg.epochs.max(1) * self.cfg.minibatches.max(1)
    }

    fn gold_of(&self, prompt: &[Turn], answer: &str) -> Option<f64> {
        let w = self.world.as_ref()?;
        let task = Task::parse(w, &prompt.last()?.content)?;
        Some(gold_reward(w, &task, answer).reward)
    }

    /// Generates and scores the rollout of iteration `iter` with `model`'s current policy.
    pub fn make_rollout(
        &mut self,
        model: &ActorCritic,
        iter: usize,
    ) -> Result<Rollout, TrainError> {
        let t0 = std::time::Instant::now();
        let policy = model.policy.valid();
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ (iter as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        let chosen: Vec<Vec<Turn>> = (0..self.cfg.prompts_per_iter)
            .map(|_| self.prompts[rng.random_range(0..self.prompts.len())].clone())
            .collect();
        let ids: Vec<Vec<u32>> = chosen
            .iter()
            .map(|c| self.tokenizer.encode_chat_prompt(&to_messages(c)))
            .collect::<Result<_, _>>()?;
        let p = ids.iter().map(Vec::len).max().unwrap_or(1);
        let max_new = self
            .cfg
            .max_new_tokens
            .min(policy.config.max_position_embeddings.saturating_sub(p));
        let params = SamplingParams {
            temperature: self.cfg.temperature as f32,
            max_new_tokens: max_new,
            stop_tokens: self.tokenizer.eos_id().into_iter().collect(),
            seed: rng.random(),
            ..Default::default()
        };
        let out = generate(&policy, &ids, &params, |_, _| {})?;
        self.generate_s += t0.elapsed().as_secs_f64();
        let t_score = std::time::Instant::now();
        let r = out.iter().map(|c| c.tokens.len()).max().unwrap_or(1).max(1);
        let b = ids.len();
        let (mut rows, mut valid, mut lens) = (
            Vec::with_capacity(b),
            Vec::with_capacity(b),
            Vec::with_capacity(b),
        );
        for (prompt, c) in ids.iter().zip(&out) {
            let mut row = vec![0u32; p - prompt.len()];
            let mut ok = vec![false; p - prompt.len()];
            row.extend(prompt);
            ok.extend(std::iter::repeat_n(true, prompt.len()));
            row.extend(&c.tokens);
            ok.extend(std::iter::repeat_n(true, c.tokens.len()));
            row.resize(p + r, 0);
            ok.resize(p + r, false);
            rows.push(row);
            valid.push(ok);
            lens.push(c.tokens.len());
        }
        // Old log-probabilities and values are computed over the same row groups as the first
        // epoch's minibatches, so the first update's forward pass is bit-identical (ratio = 1).
        let size = b.div_ceil(self.cfg.minibatches.max(1));
        // The inner (no autodiff) copy: no graph is recorded for passes that are never
        // differentiated. The kernels are the same with and without autodiff, so the first
        // update's ratio is still exactly 1 (tested).
        let inner = model.valid();
        // With the sampler's log-probabilities, a separate critic is the only pass left here (a
        // value head still needs the policy's pass, so nothing is saved with one).
        let from_generation = self.cfg.old_logprobs == OldLogprobs::Generation;
        let (rows_ref, valid_ref) = (&rows, &valid);
        let reuse = self.reuse_first_pass;
        let policy_values = || {
            let (mut old_logp, mut values) = (Vec::with_capacity(b), Vec::with_capacity(b));
            let mut first = None;
            for start in (0..b).step_by(size.max(1)) {
                let end = (start + size).min(b);
                let (rs, vs) = (&rows_ref[start..end], &valid_ref[start..end]);
                // The first chunk on the trained models, its graph kept for the update
                // ([`FirstPass`]); the others outside the autodiff graph.
                let keep = reuse && start == 0;
                let m = if keep { model } else { &inner };
                let (policy, v) = match &m.critic {
                    Some(critic) if from_generation => (None, answer_values(critic, rs, vs, p, r)),
                    _ => {
                        let (lp, logits, v) = m.logprobs_and_values(rs, vs, p, r);
                        old_logp.extend(rows_to_host(lp.clone()));
                        (Some((lp, logits)), v)
                    }
                };
                values.extend(rows_to_host(v.clone()));
                if keep {
                    first = Some(FirstPass {
                        iter,
                        policy,
                        values: v,
                    });
                }
            }
            (old_logp, values, first)
        };
        let (reference, reward) = (&self.reference, &self.reward);
        let reference_logp = || {
            rows_to_host(match reference {
                Some(reference) => answer_logprobs_only(reference, rows_ref, valid_ref, p, r, true),
                None => answer_logprobs_only(&policy, rows_ref, valid_ref, p, r, false),
            })
        };
        let reward_scores = || kiln_model::to_vec(reward.forward(rows_ref, valid_ref));
        // The four models' passes are independent: two at a time side by side, as the update
        // runs policy and critic (one model's products use two cores less well).
        let ((mut old_logp, values, first), (ref_logp, raw)) =
            rayon::join(policy_values, || rayon::join(reference_logp, reward_scores));
        self.first_pass = first;
        if from_generation {
            // Answer columns past a row's end are masked out of every loss; 0 keeps their
            // ratio finite.
            old_logp = out
                .iter()
                .map(|c| {
                    let mut lp = c.logprobs.clone();
                    lp.resize(r, 0.0);
                    lp
                })
                .collect();
        }
        let mut scores: Vec<f64> = raw.iter().map(|&s| s as f64 - self.reward.offset).collect();
        self.score_s += t_score.elapsed().as_secs_f64();
        let raw_scores = scores.clone();
        if self.cfg.whiten_rewards {
            whiten(&mut scores);
        }
        if self.cfg.reward_clip > 0.0 {
            scores
                .iter_mut()
                .for_each(|s| *s = s.clamp(-self.cfg.reward_clip, self.cfg.reward_clip));
        }
        let (mut adv, mut ret, mut kl) = (
            Vec::with_capacity(b),
            Vec::with_capacity(b),
            Vec::with_capacity(b),
        );
        for i in 0..b {
            let n = lens[i];
            let k = kl_per_token(&old_logp[i][..n], &ref_logp[i][..n]);
            let mut rewards: Vec<f64> = k.iter().map(|x| -self.kl.beta * x).collect();
            if n > 0 {
                rewards[n - 1] += scores[i];
            }
            let v: Vec<f64> = values[i][..n].iter().map(|&x| x as f64).collect();
            let (a, rt) = gae(&rewards, &v, self.cfg.gamma, self.cfg.lam);
            kl.push(k.iter().sum::<f64>());
            adv.push(a);
            ret.push(rt);
        }
        // Whiten advantages over all answer tokens of the batch.
        let mut flat: Vec<f64> = adv.iter().flatten().copied().collect();
        whiten(&mut flat);
        let mut it = flat.into_iter();
        for a in adv.iter_mut() {
            for x in a.iter_mut() {
                *x = it.next().expect("same count");
            }
        }
        let texts: Vec<String> = out
            .iter()
            .map(|c| {
                self.tokenizer
                    .decode(&c.tokens, true)
                    .map(|s| s.trim().to_string())
            })
            .collect::<Result<_, _>>()?;
        let gold: Vec<f64> = chosen
            .iter()
            .zip(&texts)
            .filter_map(|(pr, t)| self.gold_of(pr, t))
            .collect();
        // Explained variance of the critic's values for the returns.
        let (vals, rets): (Vec<f64>, Vec<f64>) = (0..b)
            .flat_map(|i| (0..lens[i]).map(move |t| (i, t)))
            .map(|(i, t)| (values[i][t] as f64, ret[i][t]))
            .unzip();
        let var = |x: &[f64]| {
            let m = x.iter().sum::<f64>() / x.len().max(1) as f64;
            x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / x.len().max(1) as f64
        };
        let resid: Vec<f64> = vals.iter().zip(&rets).map(|(v, r)| r - v).collect();
        let explained = 1.0 - var(&resid) / var(&rets).max(1e-12);
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
        let mean_kl = mean(&kl);
        self.pending = vec![
            ("rm_score".into(), mean(&raw_scores)),
            ("rm_score_std".into(), var(&raw_scores).sqrt()),
            ("kl".into(), mean_kl),
            ("beta".into(), self.kl.beta),
            (
                "response_len".into(),
                lens.iter().sum::<usize>() as f64 / b as f64,
            ),
            ("explained_var".into(), explained),
            // The rollout's rows are the longest prompt (left-padded) plus `r` answer tokens.
            ("prompt_len".into(), p as f64),
            (
                "prompt_tokens".into(),
                ids.iter().map(Vec::len).sum::<usize>() as f64 / b as f64,
            ),
        ];
        if !gold.is_empty() {
            self.pending.push(("gold_reward".into(), mean(&gold)));
        }
        self.kl.update(mean_kl, b);
        self.rollout_s += t0.elapsed().as_secs_f64();
        let gen_logp = out.iter().map(|c| c.logprobs.clone()).collect();
        Ok(Rollout {
            rows,
            valid,
            p,
            r,
            lens,
            old_logp,
            gen_logp,
            values,
            adv,
            ret,
            scores,
            kl,
            gold,
        })
    }

    /// Each row of `ro` as (tokens, answer tokens): its prompt's and its answer's, padding
    /// excluded.
    fn row_lens<'a>(
        ro: &'a Rollout,
        idx: impl IntoIterator<Item = usize> + 'a,
    ) -> impl Iterator<Item = (usize, usize)> + 'a {
        idx.into_iter().map(|i| {
            let prompt = ro.valid[i][..ro.p].iter().filter(|&&v| v).count();
            (prompt + ro.lens[i], ro.lens[i])
        })
    }

    /// FLOPs of making `ro`: sampling (as one forward pass over each row: the KV cache does the
    /// same multiply-adds token by token), then the scoring passes of [`Self::make_rollout`].
    fn rollout_flops(&self, model: &ActorCritic, ro: &Rollout) -> f64 {
        let all = || Self::row_lens(ro, 0..ro.rows.len());
        let policy = FlopCount::new(&model.policy.config, 0.0);
        let v = policy.vocab;
        let mut flops = policy.rows(all(), v, false);
        let from_generation = self.cfg.old_logprobs == OldLogprobs::Generation;
        match &model.critic {
            Some(critic) => {
                let c = FlopCount::new(critic.llama_config(), 0.0);
                flops += c.rows(all(), 1, false);
                if !from_generation {
                    flops += policy.rows(all(), v, false);
                }
            }
            None => flops += policy.rows(all(), v + 1, false),
        }
        // the reference's log-probabilities and the reward model's score of each last token
        flops += policy.rows(all(), v, false);
        let rm = FlopCount::new(self.reward.llama_config(), 0.0);
        flops + rm.rows(all().map(|(len, _)| (len, 1)), 1, false)
    }

    /// FLOPs of minibatch `idx`'s update: the policy's and the critic's passes forward and
    /// backward (less the forward passes `first` holds), and the ptx term's.
    fn minibatch_flops(
        &self,
        model: &ActorCritic,
        ro: &Rollout,
        idx: &[usize],
        first: Option<&FirstPass>,
    ) -> f64 {
        let rows = || Self::row_lens(ro, idx.iter().copied());
        let (total, trainable) = crate::optim::count_params(&model.policy);
        let policy = FlopCount::new(&model.policy.config, trainable as f64 / total.max(1) as f64);
        let v = policy.vocab;
        let held = first.is_some_and(|f| f.policy.is_some());
        let mut flops = match &model.critic {
            Some(critic) => {
                let c = FlopCount::new(critic.llama_config(), 1.0);
                let forward = if first.is_some() {
                    c.rows(rows(), 1, false)
                } else {
                    0.0
                };
                policy.rows(rows(), v, true) + c.rows(rows(), 1, true) - forward
            }
            None => policy.rows(rows(), v + 1, true),
        };
        if held {
            flops -= policy.rows(rows(), v + model.critic.is_none() as usize, false);
        }
        if self.ptx.is_some() && self.cfg.ptx_coef > 0.0 {
            let t = self
                .cfg
                .ptx_seq_len
                .min(model.policy.config.max_position_embeddings);
            flops += policy.rows(std::iter::repeat_n((t, t), self.cfg.ptx_batch), v, true);
        }
        flops
    }

    /// Row indices of minibatch `m` of epoch `e` of iteration `iter`.
    pub fn minibatch(&self, iter: usize, e: usize, m: usize, b: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..b).collect();
        if e > 0 {
            order.shuffle(&mut StdRng::seed_from_u64(
                self.seed ^ ((iter * 131 + e) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
        }
        let size = b.div_ceil(self.cfg.minibatches.max(1));
        order[(m * size).min(b)..((m + 1) * size).min(b)].to_vec()
    }

    /// The PPO-ptx loss of minibatch `idx` of `ro`, through `first`'s forward pass when it has
    /// the policy's ([`FirstPass`]); also returns (clip fraction, approx KL, entropy, policy
    /// loss, value loss, ptx loss) for the logs.
    pub fn minibatch_loss(
        &self,
        model: &ActorCritic,
        ro: &Rollout,
        idx: &[usize],
        step: usize,
        first: Option<FirstPass>,
    ) -> (Tensor<1>, [f64; 6]) {
        let mb = self.minibatch_inputs(model, ro, idx);
        let (p, r) = (ro.p, ro.r);
        let (logp, dist, v) = match first {
            Some(FirstPass {
                policy: Some((logp, dist)),
                values,
                ..
            }) => (logp, dist, values),
            _ => model.logprobs_and_values(&mb.rows, &mb.valid, p, r),
        };
        let policy = self.policy_terms(&model.policy, &mb, logp, dist, ro, idx, step);
        let vf = self.value_term(v, &mb);
        let loss = policy.loss.clone() + vf.clone() * self.cfg.vf_coef;
        let stats = self.minibatch_stats(&policy, kiln_model::to_vec(vf)[0] as f64, ro, idx);
        (loss, stats)
    }

    /// [`Self::minibatch_loss`]` · scale`'s gradients and value, with a separate critic: the
    /// policy's terms and the critic's value loss share no parameter, so their forward and
    /// backward passes run side by side ([`backward_both`]). Their gradients are those of the
    /// summed loss; one model's products at a PPO minibatch's size (about 800 tokens) use two
    /// cores less well than two models' products at once (measured on a Zen 4: forward and
    /// backward of both `tiny` models 1.14-1.17x faster side by side, `examples/two_models.rs`).
    /// The first minibatch goes through `first`'s forward passes where it has them
    /// ([`FirstPass`]). `None` for a value head on the policy, whose values and
    /// log-probabilities come from one pass.
    pub fn minibatch_grads(
        &self,
        model: &ActorCritic,
        ro: &Rollout,
        idx: &[usize],
        step: usize,
        scale: f64,
        first: Option<FirstPass>,
    ) -> Option<(Vec<GradientsParams>, f64, [f64; 6])> {
        let critic = model.critic.as_ref()?;
        let mb = self.minibatch_inputs(model, ro, idx);
        let (p, r) = (ro.p, ro.r);
        let (first_policy, first_values) = match first {
            Some(f) => (f.policy, Some(f.values)),
            None => (None, None),
        };
        let ((g_policy, v_policy, policy), (g_critic, v_critic, vf)) = backward_both(
            (model, |m: &ActorCritic| {
                let (logp, dist) = first_policy
                    .unwrap_or_else(|| answer_logprobs(&m.policy, &mb.rows, &mb.valid, p, r));
                let terms = self.policy_terms(&m.policy, &mb, logp, dist, ro, idx, step);
                (terms.loss.clone() * scale, terms)
            }),
            (model, |_: &ActorCritic| {
                let v = first_values
                    .unwrap_or_else(|| answer_values(critic, &mb.rows, &mb.valid, p, r));
                let vf = self.value_term(v, &mb);
                let value = kiln_model::to_vec(vf.clone())[0] as f64;
                (vf * (self.cfg.vf_coef * scale), value)
            }),
        );
        let stats = self.minibatch_stats(&policy, vf, ro, idx);
        Some((vec![g_policy, g_critic], v_policy + v_critic, stats))
    }

    /// The critic's clipped value loss on a minibatch, from its values `v` `(B, R)`.
    fn value_term(&self, v: Tensor<2>, mb: &MinibatchInputs) -> Tensor<1> {
        value_loss(
            v,
            mb.v_old.clone(),
            mb.ret.clone(),
            mb.mask.clone(),
            self.cfg.vf_clip,
        )
    }

    /// The minibatch's rows and the rollout's per-token figures for it, on the policy's device.
    fn minibatch_inputs(
        &self,
        model: &ActorCritic,
        ro: &Rollout,
        idx: &[usize],
    ) -> MinibatchInputs {
        let device = model.policy.device();
        let r = ro.r;
        let mb = idx.len();
        let host = |f: &dyn Fn(usize, usize) -> f32| -> Tensor<2> {
            let v: Vec<f32> = idx
                .iter()
                .flat_map(|&i| (0..r).map(move |t| (i, t)))
                .map(|(i, t)| f(i, t))
                .collect();
            Tensor::from_data(TensorData::new(v, [mb, r]), &device)
        };
        let answer = |x: &dyn Fn(usize, usize) -> f64| {
            host(&|i, t| if t < ro.lens[i] { x(i, t) as f32 } else { 0.0 })
        };
        MinibatchInputs {
            rows: idx.iter().map(|&i| ro.rows[i].clone()).collect(),
            valid: idx.iter().map(|&i| ro.valid[i].clone()).collect(),
            mask: host(&|i, t| if t < ro.lens[i] { 1.0 } else { 0.0 }),
            old: host(&|i, t| ro.old_logp[i][t]),
            adv: answer(&|i, t| ro.adv[i][t]),
            ret: answer(&|i, t| ro.ret[i][t]),
            v_old: host(&|i, t| ro.values[i][t]),
        }
    }

    /// The policy's part of the loss: the clipped surrogate, minus the entropy bonus, plus the
    /// pre-training (ptx) term.
    #[allow(clippy::too_many_arguments)]
    fn policy_terms(
        &self,
        policy: &Llama,
        mb: &MinibatchInputs,
        logp: Tensor<2>,
        dist: AnswerDist,
        ro: &Rollout,
        idx: &[usize],
        step: usize,
    ) -> PolicyTerms {
        let (n_rows, r) = (idx.len(), ro.r);
        let pg = policy_loss(
            logp.clone(),
            mb.old.clone(),
            mb.adv.clone(),
            mb.mask.clone(),
            self.cfg.clip,
        );
        // Entropy of the policy at answer positions: differentiated when it is in the loss, else
        // only measured (from the logits: one pass over them, no autodiff graph).
        let mut loss = pg.clone();
        let entropy = if self.cfg.ent_coef > 0.0 {
            let ent = match dist {
                AnswerDist::Logits(logits) => {
                    let v = logits.dims()[2];
                    kiln_model::fused::entropy_reference(logits.reshape([n_rows * r, v]))
                        .reshape([n_rows, r])
                }
                AnswerDist::Entropy(ent) => ent,
            };
            let ent = masked_mean(ent, mb.mask.clone());
            loss = loss - ent.clone() * self.cfg.ent_coef;
            kiln_model::to_vec(ent)[0] as f64
        } else {
            let rows_h = kiln_model::to_vec(match dist {
                AnswerDist::Logits(logits) => {
                    let v = logits.dims()[2];
                    kiln_model::fused::entropy(logits.reshape([n_rows * r, v]))
                }
                AnswerDist::Entropy(ent) => ent.reshape([n_rows * r]),
            });
            let (mut sum, mut n) = (0.0f64, 0usize);
            for (k, &i) in idx.iter().enumerate() {
                for t in 0..ro.lens[i].min(r) {
                    sum += rows_h[k * r + t] as f64;
                    n += 1;
                }
            }
            sum / n.max(1) as f64
        };
        let mut ptx_value = 0.0;
        if let (Some(shard), true) = (&self.ptx, self.cfg.ptx_coef > 0.0) {
            let t = self
                .cfg
                .ptx_seq_len
                .min(policy.config.max_position_embeddings);
            let mut rng = StdRng::seed_from_u64(
                self.seed ^ 0x9_7778 ^ (step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
            );
            let windows: Vec<Vec<u32>> = (0..self.cfg.ptx_batch)
                .map(|_| {
                    let s = rng.random_range(0..shard.len() - t - 1);
                    shard.tokens(s, s + t + 1)
                })
                .collect();
            // Pre-training's loss on the windows, as the base model learned it.
            let ptx = crate::stages::pretrain::lm_loss(policy, &windows);
            ptx_value = kiln_model::to_vec(ptx.clone())[0] as f64;
            loss = loss + ptx * self.cfg.ptx_coef;
        }
        PolicyTerms {
            loss,
            pg: kiln_model::to_vec(pg)[0] as f64,
            entropy,
            ptx: ptx_value,
            logp: kiln_model::to_vec(logp),
        }
    }

    /// (clip fraction, approx KL, entropy, policy loss, value loss, ptx loss) of a minibatch.
    fn minibatch_stats(
        &self,
        policy: &PolicyTerms,
        vf: f64,
        ro: &Rollout,
        idx: &[usize],
    ) -> [f64; 6] {
        let (r, lp) = (ro.r, &policy.logp);
        let (mut clipped, mut akl, mut n) = (0usize, 0.0f64, 0usize);
        for (k, &i) in idx.iter().enumerate() {
            for t in 0..ro.lens[i] {
                let d = (lp[k * r + t] - ro.old_logp[i][t]) as f64;
                if (d.exp() - 1.0).abs() > self.cfg.clip {
                    clipped += 1;
                }
                akl += 0.5 * d * d;
                n += 1;
            }
        }
        [
            clipped as f64 / n.max(1) as f64,
            akl / n.max(1) as f64,
            policy.entropy,
            policy.pg,
            vf,
            policy.ptx,
        ]
    }

    /// Max |ratio − 1| on the first minibatch of a fresh rollout, before any update: 0 when the
    /// log-probabilities used for the ratio are those of generation time.
    pub fn first_ratio_deviation(&mut self, model: &ActorCritic) -> Result<(f64, f64), TrainError> {
        let ro = self.make_rollout(model, 0)?;
        let idx = self.minibatch(0, 0, 0, ro.rows.len());
        let rows: Vec<Vec<u32>> = idx.iter().map(|&i| ro.rows[i].clone()).collect();
        let valid: Vec<Vec<bool>> = idx.iter().map(|&i| ro.valid[i].clone()).collect();
        let lp = kiln_model::to_vec(model.logprobs_and_values(&rows, &valid, ro.p, ro.r).0);
        let (mut dev, mut gen_dev) = (0.0f64, 0.0f64);
        for (k, &i) in idx.iter().enumerate() {
            for t in 0..ro.lens[i] {
                dev = dev.max(
                    ((lp[k * ro.r + t] - ro.old_logp[i][t]) as f64)
                        .exp()
                        .sub(1.0)
                        .abs(),
                );
                gen_dev = gen_dev.max((ro.gen_logp[i][t] - ro.old_logp[i][t]).abs() as f64);
            }
        }
        Ok((dev, gen_dev))
    }
}

use std::ops::Sub as _;

/// Names of the per-minibatch statistics `minibatch_loss` returns, in order.
const UPDATE_STATS: [&str; 6] = [
    "clip_frac",
    "approx_kl",
    "entropy",
    "pg_loss",
    "vf_loss",
    "ptx_loss",
];

#[derive(Serialize, Deserialize)]
struct PpoState {
    kl: KlController,
}

/// A minibatch's rows and the rollout's per-token figures for them, `(B, R)` each.
struct MinibatchInputs {
    rows: Vec<Vec<u32>>,
    valid: Vec<Vec<bool>>,
    mask: Tensor<2>,
    old: Tensor<2>,
    adv: Tensor<2>,
    ret: Tensor<2>,
    v_old: Tensor<2>,
}

/// The policy's part of a minibatch's loss, and what the logs read from it.
struct PolicyTerms {
    loss: Tensor<1>,
    pg: f64,
    entropy: f64,
    ptx: f64,
    /// The answer tokens' log-probabilities, `B x R` row-major.
    logp: Vec<f32>,
}

impl Ppo {
    /// Step `step`'s minibatch through `f` (the rollout is made first when the step starts an
    /// iteration); the update is timed from here to [`Stage::after_step`], and `f`'s statistics
    /// logged. Returns `f`'s output and the minibatch's tokens.
    fn on_minibatch<T>(
        &mut self,
        model: &ActorCritic,
        step: usize,
        f: impl FnOnce(&Self, &Rollout, &[usize], Option<FirstPass>) -> (T, [f64; 6]),
    ) -> Result<(T, usize), TrainError> {
        let per = self.steps_per_iteration();
        let (iter, k) = (step / per, step % per);
        let mut flops = 0.0;
        if self.rollout.as_ref().is_none_or(|(i, _)| *i != iter) {
            let ro = self.make_rollout(model, iter)?;
            flops += self.rollout_flops(model, &ro);
            self.rollout = Some((iter, ro));
            self.stats.clear();
        }
        let t0 = std::time::Instant::now();
        // The scoring pass's forward pass serves the iteration's first minibatch only (taken
        // in any case: its graph is freed here otherwise).
        let first = self.first_pass.take().filter(|f| k == 0 && f.iter == iter);
        let (_, ro) = self.rollout.as_ref().expect("made above");
        let minibatches = self.cfg.minibatches.max(1);
        let idx = self.minibatch(iter, k / minibatches, k % minibatches, ro.rows.len());
        let tokens: usize = idx.iter().map(|&i| ro.lens[i]).sum();
        flops += self.minibatch_flops(model, ro, &idx, first.as_ref());
        let (out, s) = f(self, ro, &idx, first);
        self.step_flops = Some(flops);
        self.stats
            .extend(UPDATE_STATS.iter().zip(s).map(|(n, v)| (n.to_string(), v)));
        self.update_start = Some(t0);
        Ok((out, tokens))
    }
}

impl Stage<ActorCritic> for Ppo {
    fn train_loss(
        &mut self,
        model: &ActorCritic,
        step: usize,
        _micro: usize,
    ) -> Result<(Tensor<1>, usize), TrainError> {
        self.on_minibatch(model, step, |s, ro, idx, first| {
            s.minibatch_loss(model, ro, idx, step, first)
        })
    }

    fn train_grads(
        &mut self,
        model: &ActorCritic,
        step: usize,
        _micro: usize,
        scale: f64,
    ) -> Result<Option<StageGrads>, TrainError> {
        // A value head: one pass for both, back-propagated by the trainer through `train_loss`
        // (which makes the rollout and times the update itself).
        if model.critic.is_none() {
            return Ok(None);
        }
        let (g, tokens) = self.on_minibatch(model, step, |s, ro, idx, first| {
            let (grads, loss, stats) = s
                .minibatch_grads(model, ro, idx, step, scale, first)
                .expect("a separate critic (checked above)");
            ((grads, loss), stats)
        })?;
        Ok(Some(StageGrads::of(g, tokens)))
    }

    fn flops(&mut self, _count: &FlopCount, _step: usize, _micro: usize) -> Option<f64> {
        self.step_flops.take()
    }

    fn after_step(&mut self, _step: usize) {
        if let Some(t0) = self.update_start.take() {
            self.update_s += t0.elapsed().as_secs_f64();
        }
    }

    fn evaluate(&mut self, model: &ActorCritic) -> Result<Vec<(String, f64)>, TrainError> {
        let policy = &model.policy;
        let prompts = &self.eval_prompts;
        let greedy = answer_prompts(
            policy,
            &self.tokenizer,
            prompts,
            &SamplingParams::greedy(self.cfg.max_new_tokens),
            32,
        )?;
        let seqs: Vec<Vec<u32>> = prompts
            .iter()
            .zip(&greedy)
            .map(|(p, (a, _))| crate::stages::reward::encode_answer(&self.tokenizer, p, a))
            .collect::<Result<_, _>>()?;
        let scores: Vec<f64> = seqs
            .chunks(32)
            .flat_map(|c| self.reward.score(c))
            .map(|x| x as f64)
            .collect();
        let rm = MeanCi::of(&scores);
        let mut m = vec![
            ("neg_rm_score".to_string(), -rm.mean),
            ("rm_score".into(), rm.mean),
        ];
        let gold: Vec<f64> = prompts
            .iter()
            .zip(&greedy)
            .filter_map(|(p, (a, _))| self.gold_of(p, a))
            .collect();
        if !gold.is_empty() {
            m.push(("gold_reward".into(), MeanCi::of(&gold).mean));
        }
        // KL to the reference on sampled answers (temperature 1), summed over tokens.
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|c| self.tokenizer.encode_chat_prompt(&to_messages(c)))
            .collect::<Result<_, _>>()?;
        let params = SamplingParams {
            max_new_tokens: self.cfg.max_new_tokens,
            stop_tokens: self.tokenizer.eos_id().into_iter().collect(),
            seed: 7,
            ..Default::default()
        };
        let mut kls = Vec::new();
        for chunk in ids.chunks(32) {
            let out = generate(policy, chunk, &params, |_, _| {})?;
            for (p, c) in chunk.iter().zip(&out) {
                if c.tokens.is_empty() {
                    continue;
                }
                let mut seq = p.clone();
                seq.extend(&c.tokens);
                let device = policy.device();
                let input = ForwardInput::causal(&[seq.clone()], &device);
                let logits = match &self.reference {
                    Some(reference) => reference.forward(&input, None),
                    None => policy.forward(&input.base(), None),
                };
                let lp = kiln_model::to_vec(log_softmax(logits, 2));
                let v = policy.config.vocab_size;
                let kl: f64 = c
                    .tokens
                    .iter()
                    .enumerate()
                    .map(|(j, &tok)| {
                        (c.logprobs[j] - lp[(p.len() - 1 + j) * v + tok as usize]) as f64
                    })
                    .sum();
                kls.push(kl);
            }
        }
        m.push(("kl".into(), MeanCi::of(&kls).mean));
        Ok(m)
    }

    fn samples(&mut self, model: &ActorCritic) -> Result<Vec<String>, TrainError> {
        let prompts: Vec<Vec<Turn>> = self.eval_prompts.iter().take(2).cloned().collect();
        let a = answer_prompts(
            &model.policy,
            &self.tokenizer,
            &prompts,
            &SamplingParams::greedy(self.cfg.max_new_tokens),
            8,
        )?;
        Ok(prompts
            .iter()
            .zip(a)
            .map(|(p, (a, _))| format!("{} -> {a}", p.last().map_or("", |t| t.content.as_str())))
            .collect())
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(PpoState {
            kl: self.kl.clone(),
        })
        .expect("json")
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<(), TrainError> {
        if !state.is_null() {
            let s: PpoState = serde_json::from_value(state.clone())
                .map_err(|e| TrainError::Other(format!("PPO state in checkpoint: {e}")))?;
            self.kl = s.kl;
        }
        Ok(())
    }

    fn boundary(&self, steps: usize) -> bool {
        steps.is_multiple_of(self.steps_per_iteration())
    }

    fn log_extra(&mut self) -> Vec<(String, f64)> {
        let mut out = std::mem::take(&mut self.pending);
        for n in UPDATE_STATS {
            let v: Vec<f64> = self
                .stats
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| *v)
                .collect();
            if !v.is_empty() {
                out.push((n.to_string(), v.iter().sum::<f64>() / v.len() as f64));
            }
        }
        self.stats.clear();
        out.push(("rollout_s".into(), std::mem::take(&mut self.rollout_s)));
        out.push(("generate_s".into(), std::mem::take(&mut self.generate_s)));
        out.push(("score_s".into(), std::mem::take(&mut self.score_s)));
        out.push(("update_s".into(), std::mem::take(&mut self.update_s)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_model::default_device;

    #[test]
    fn kl_estimate_is_logp_difference() {
        assert_eq!(kl_per_token(&[-1.0, -0.5], &[-1.5, -0.5]), vec![0.5, 0.0]);
    }

    #[test]
    fn gae_matches_a_hand_computed_example() {
        // rewards [0, 0, 1], values [0.5, 0.6, 0.7], γ = 0.9, λ = 0.8.
        let (adv, ret) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.6, 0.7], 0.9, 0.8);
        // δ2 = 1 − 0.7 = 0.3; δ1 = 0.9·0.7 − 0.6 = 0.03; δ0 = 0.9·0.6 − 0.5 = 0.04
        // A2 = 0.3; A1 = 0.03 + 0.72·0.3 = 0.246; A0 = 0.04 + 0.72·0.246 = 0.21712
        let expect = [0.21712, 0.246, 0.3];
        for (a, e) in adv.iter().zip(expect) {
            assert!((a - e).abs() < 1e-12, "{adv:?}");
        }
        assert!((ret[0] - 0.71712).abs() < 1e-12);
        // γ = λ = 1: advantages are the return-to-go minus the value.
        let (adv, _) = gae(&[0.1, -0.2, 1.0], &[0.0, 0.0, 0.0], 1.0, 1.0);
        assert!((adv[0] - 0.9).abs() < 1e-12 && (adv[1] - 0.8).abs() < 1e-12);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance() {
        let mut x = vec![1.0, 2.0, 3.0, 10.0];
        whiten(&mut x);
        let m = x.iter().sum::<f64>() / 4.0;
        let v = x.iter().map(|a| (a - m).powi(2)).sum::<f64>() / 4.0;
        assert!(m.abs() < 1e-12 && (v - 1.0).abs() < 1e-9);
    }

    #[test]
    fn adaptive_kl_moves_beta_toward_target() {
        let mut c = KlController {
            beta: 0.1,
            target: 6.0,
            horizon: 10000.0,
            adaptive: true,
        };
        c.update(12.0, 100); // error clipped to +0.2: β · (1 + 0.2 · 100 / 10000)
        assert!((c.beta - 0.1 * 1.002).abs() < 1e-12);
        c.beta = 0.1;
        c.update(5.7, 100); // error −0.05
        assert!((c.beta - 0.1 * (1.0 - 0.05 * 0.01)).abs() < 1e-12);
        let mut f = KlController {
            adaptive: false,
            ..c.clone()
        };
        f.update(100.0, 100);
        assert_eq!(f.beta, c.beta);
    }

    /// The gradient of the clipped surrogate vanishes where clipping binds in the direction of
    /// the advantage (r > 1 + ε with A > 0; r < 1 − ε with A < 0), and not elsewhere.
    #[test]
    fn clipped_surrogate_gradient() {
        let device = default_device().autodiff();
        // log-ratios giving r = 1.5, 0.5, 1.5, 0.5, 1.1
        let lr: Vec<f32> = [1.5f32, 0.5, 1.5, 0.5, 1.1]
            .iter()
            .map(|r| r.ln())
            .collect();
        let logp = Tensor::<2>::from_data(TensorData::new(lr, [1, 5]), &device).require_grad();
        let old = Tensor::<2>::zeros([1, 5], &device);
        let adv = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, -1.0, -1.0, 1.0, 1.0], [1, 5]),
            &device,
        );
        let mask = Tensor::<2>::ones([1, 5], &device);
        let loss = policy_loss(logp.clone(), old, adv, mask, 0.2);
        let g = kiln_model::to_vec(logp.grad(&loss.backward()).unwrap());
        // Clipped (zero): r=1.5,A>0 and r=0.5,A<0. Unclipped: −A·r/5 for the others.
        assert_eq!(g[0], 0.0);
        assert_eq!(g[1], 0.0);
        assert!((g[2] - 1.5 / 5.0).abs() < 1e-6, "{g:?}"); // A<0, r>1+ε: pessimistic term is unclipped
        assert!((g[3] + 0.5 / 5.0).abs() < 1e-6, "{g:?}"); // A>0, r<1−ε: unclipped
        assert!((g[4] + 1.1 / 5.0).abs() < 1e-6, "{g:?}"); // inside the range
    }

    #[test]
    fn value_clip_takes_the_pessimistic_loss() {
        let d = default_device();
        let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [1, 3]), &d);
        // v_old 0; v = [1, 0.1, -1]; returns [1, 0.1, 0]; clip 0.2.
        let l = kiln_model::to_vec(value_loss(
            t(vec![1.0, 0.1, -1.0]),
            t(vec![0.0; 3]),
            t(vec![1.0, 0.1, 0.0]),
            t(vec![1.0; 3]),
            0.2,
        ))[0];
        // token 0: max(0, (0.2−1)²=0.64) = 0.64; token 1: 0; token 2: max(1, (−0.2)²) = 1
        assert!((l - 0.5 * (0.64 + 0.0 + 1.0) / 3.0).abs() < 1e-6, "{l}");
    }
}
