//! The one training loop. A [`Stage`] supplies the loss of a micro-batch (a deterministic
//! function of the step, so resumed runs see the same data) and its evaluation; the
//! [`Trainer`] owns the rest: AdamW, the schedule, global-norm clipping, accumulation, logging to
//! the terminal and `metrics.jsonl`, evaluation, checkpoints, resume, Ctrl-C, divergence.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_model::burn::module::{Module, ModuleMapper, Param};
use kiln_model::burn::optim::{GradientsAccumulator, GradientsParams};
use kiln_model::burn::tensor::{Device, Tensor};
use kiln_model::peft::PeftConfig;
use kiln_model::{Llama, LlamaConfig, ModelDir};
use kiln_tokenizer::Tokenizer;
use serde_json::json;

use crate::checkpoint::{self, TrainerState};
use crate::metrics::MetricsLog;
use crate::optim::{count_params, AdamW};
use crate::perf::FlopCount;
use crate::plot::{line_chart, Series};
use crate::schedule::lr_at;
use crate::{io_err, TrainConfig, TrainError, STOP};

/// A model the trainer can checkpoint.
pub trait TrainModel: Module + Sized {
    fn save_dir(&self, tokenizer: &Tokenizer, dir: &Path) -> Result<(), TrainError>;
    fn load_dir(dir: &Path, device: &Device) -> Result<Self, TrainError>;
    fn llama_config(&self) -> &LlamaConfig;
    /// Marks again which parameters train (a loaded checkpoint trains everything).
    fn restore_trainable(self, _peft: &PeftConfig) -> Result<Self, TrainError> {
        Ok(self)
    }
}

impl TrainModel for Llama {
    fn save_dir(&self, tokenizer: &Tokenizer, dir: &Path) -> Result<(), TrainError> {
        Ok(ModelDir::save(self, tokenizer, dir)?)
    }
    fn load_dir(dir: &Path, device: &Device) -> Result<Self, TrainError> {
        Ok(kiln_model::adapter_dir::load_any(dir, device)?)
    }
    fn llama_config(&self) -> &LlamaConfig {
        &self.config
    }
    fn restore_trainable(self, peft: &PeftConfig) -> Result<Self, TrainError> {
        Ok(kiln_model::peft::set_trainable(self, peft)?)
    }
}

/// Sets the process's matmul precision for a run, saying when bf16 was asked for but runs f32.
pub fn set_precision(p: kiln_model::fused::MatmulPrecision) {
    use kiln_model::fused;
    fused::set_matmul_precision(p);
    if p == fused::MatmulPrecision::Bf16 && !fused::bf16_active() {
        if fused::bf16_decoding() {
            tracing::warn!(
                "precision = \"bf16\": bf16 products are slower than f32 on this CPU (AVX512-BF16 without AMX tiles), so training's products run in f32; decoding reads bf16 weights"
            );
        } else {
            tracing::warn!(
                "precision = \"bf16\": this CPU has no AVX512-BF16 (or the fused kernels are off), so products run in f32"
            );
        }
    }
}

/// A micro-batch's gradients as [`Stage::train_grads`] computes them: one set per part of the
/// loss (their sum is the loss's gradient), the loss's value (scaled) and the tokens it covered.
pub struct StageGrads {
    pub grads: Vec<GradientsParams>,
    pub loss: f64,
    pub tokens: usize,
}

impl StageGrads {
    /// From the parts' gradients and the loss's value (what [`backward_halves`] returns), and
    /// the tokens covered.
    pub fn of((grads, loss): (Vec<GradientsParams>, f64), tokens: usize) -> Self {
        StageGrads {
            grads,
            loss,
            tokens,
        }
    }
}

/// The same weights as `model`'s as new autodiff leaves, under the same parameter ids (and
/// the same trainable set): a graph built on the twin shares no node with one built on `model`,
/// so burn keeps the two apart (graphs that share a node are merged under one lock: in `kiln
/// bench`, two halves of a batch on the same model ran 20% slower side by side than as one
/// batch, though `examples/halves.rs` does not show it).
/// Gradients taken on the twin ([`GradientsParams::from_grads`]) are keyed by the same ids.
pub fn twin<M: Module>(model: &M) -> M {
    struct Twin;
    impl ModuleMapper for Twin {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let trains = tensor.is_require_grad();
            let mut leaf = tensor.inner().autodiff();
            if trains {
                leaf = leaf.require_grad();
            }
            Param::from_mapped_value(id, leaf, mapper)
        }
    }
    model.clone().map(&mut Twin)
}

/// Back-propagates two parts of a loss side by side (`rayon::join`), the second on a [`twin`]
/// of `model`: each closure builds its part on the model it is given, already weighted so that
/// the parts sum to the whole loss (the two halves of a batch). Returns each part's gradients,
/// keyed by `model`'s parameter ids, and the sum of their values: together, the gradients of
/// the whole loss.
///
/// Two halves at once keep both cores busier than one batch whose every operation is split in
/// two: the single-threaded stretches (the autodiff graph's bookkeeping, small element-wise
/// kernels, the ends of each parallel product) overlap with the other half's work. Measured on
/// a Zen 4, `kiln bench` training, alternating: `tiny` +4.5-7.7% at f32 and +2.4-7.5% at bf16,
/// `small` +2-5% (`examples/halves.rs` times the forward and backward passes alone).
pub fn backward_pair<M: Module + Sync>(
    model: &M,
    a: impl FnOnce(&M) -> Tensor<1> + Send,
    b: impl FnOnce(&M) -> Tensor<1> + Send,
) -> (Vec<GradientsParams>, f64) {
    let other = twin(model);
    let ((ga, va, ()), (gb, vb, ())) =
        backward_both((model, |m: &M| (a(m), ())), (&other, |m: &M| (b(m), ())));
    (vec![ga, gb], va + vb)
}

/// The gradients of a loss that is a weighted mean over `items` (each item's weight, summed over
/// a slice, from `weight`), times `scale`, and its value: the two halves of `items`, each
/// `loss`'s mean over its half weighted by its share of the total weight, back-propagated side by
/// side ([`backward_pair`]). `None` when a half weighs nothing (fewer than two items, or a half
/// with no target). The pre-training, SFT and reward steps.
pub fn backward_halves<M: Module + Sync, T: Sync>(
    model: &M,
    items: &[T],
    weight: impl Fn(&[T]) -> usize,
    loss: impl Fn(&M, &[T]) -> Tensor<1> + Sync,
    scale: f64,
) -> Option<(Vec<GradientsParams>, f64)> {
    let (x, y) = items.split_at(items.len() / 2);
    let (wx, wy) = (weight(x), weight(y));
    if wx == 0 || wy == 0 {
        return None;
    }
    let total = (wx + wy) as f64;
    let part = |m: &M, h: &[T], w: usize| loss(m, h) * (scale * w as f64 / total);
    Some(backward_pair(model, |m| part(m, x, wx), |m| part(m, y, wy)))
}

/// The side-by-side pass under [`backward_pair`] and PPO's policy-and-critic update: each
/// closure builds a loss (and whatever else its caller wants back) on its model, whose graph must
/// share no node with the other's (burn would merge them under one lock). Returns, for each, its
/// gradients for its model's parameters, the loss's value and the extra.
pub fn backward_both<M: Module + Sync, A: Send, B: Send>(
    (ma, a): (&M, impl FnOnce(&M) -> (Tensor<1>, A) + Send),
    (mb, b): (&M, impl FnOnce(&M) -> (Tensor<1>, B) + Send),
) -> ((GradientsParams, f64, A), (GradientsParams, f64, B)) {
    fn run<M: Module, T>(m: &M, (loss, extra): (Tensor<1>, T)) -> (GradientsParams, f64, T) {
        let value = kiln_model::to_vec(loss.clone())[0] as f64;
        (
            GradientsParams::from_grads(loss.backward(), m),
            value,
            extra,
        )
    }
    rayon::join(|| run(ma, a(ma)), || run(mb, b(mb)))
}

/// What a stage supplies.
pub trait Stage<M> {
    /// Loss of micro-batch `micro` of optimizer step `step`, and the tokens it covered. Must be
    /// a deterministic function of (step, micro) for exact resume.
    fn train_loss(
        &mut self,
        model: &M,
        step: usize,
        micro: usize,
    ) -> Result<(Tensor<1>, usize), TrainError>;
    /// The gradients of micro-batch `micro` of step `step`, each loss scaled by `scale`, when
    /// the stage back-propagates its loss itself in parts side by side: the two halves of a batch
    /// ([`backward_pair`]: pre-training, SFT, reward), or PPO's policy and separate critic.
    /// `None` (the default): the trainer back-propagates [`Self::train_loss`]. The gradients
    /// must be those of `train_loss · scale`.
    fn train_grads(
        &mut self,
        _model: &M,
        _step: usize,
        _micro: usize,
        _scale: f64,
    ) -> Result<Option<StageGrads>, TrainError> {
        Ok(None)
    }
    /// Held-out metrics of `model` (an inference copy). The first one is the one the best
    /// checkpoint is chosen by (lower is better).
    fn evaluate(&mut self, model: &M) -> Result<Vec<(String, f64)>, TrainError>;
    /// A few sample outputs to show a person during evaluation.
    fn samples(&mut self, _model: &M) -> Result<Vec<String>, TrainError> {
        Ok(Vec::new())
    }
    /// Stage state that must survive a resume (PPO's KL controller, say).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<(), TrainError> {
        Ok(())
    }
    /// Whether the run may stop and checkpoint after `steps` completed steps (PPO: only between
    /// iterations, so that a resumed run regenerates the same rollouts).
    fn boundary(&self, _steps: usize) -> bool {
        true
    }
    /// Called after each optimizer step (PPO times its updates from the minibatch's forward
    /// pass to here, so backward and optimizer are inside).
    fn after_step(&mut self, _step: usize) {}
    /// Stage metrics to add to the step line and `metrics.jsonl` (averaged by the stage itself).
    fn log_extra(&mut self) -> Vec<(String, f64)> {
        Vec::new()
    }
    /// The FLOPs that micro-batch `micro` of step `step` took, just computed: its passes as
    /// `count` (the model's shape, the share of its weights that train) counts them, and
    /// anything else the stage ran for it (PPO's rollout). The MFU the trainer logs divides
    /// them by time. `None` (the default): [`crate::perf::train_flops_per_token`] per token, a
    /// pre-training step's count.
    fn flops(&mut self, _count: &FlopCount, _step: usize, _micro: usize) -> Option<f64> {
        None
    }
}

pub struct Trainer {
    /// Log prefix and metrics tag: pretrain, sft, reward, ppo.
    pub name: String,
    pub config: TrainConfig,
    pub out: PathBuf,
    pub tokenizer: Tokenizer,
    pub resume: bool,
    /// Stop (as Ctrl-C would) after this many steps: for tests of interruption.
    pub stop_after: Option<usize>,
    /// Matmul peak for MFU; measured when None.
    pub peak_gflops: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub step: usize,
    pub interrupted: bool,
    pub last_eval: Vec<(String, f64)>,
    pub best_val: Option<f64>,
    pub wall_s: f64,
    pub tokens: u64,
    /// Tokens per second of this run (not counting time before a resume).
    pub tokens_per_s: f64,
    /// Parameters of the model, and how many of them trained.
    pub params: usize,
    pub trainable_params: usize,
    /// This run's training steps (evaluations and checkpoints left out): their FLOPs as the
    /// stage counts them ([`Stage::flops`]), and those per second over the CPU's peak.
    pub flops: f64,
    pub mfu: f64,
}

fn finite_or(step: usize, what: &str, value: f64, ckpt: &Path) -> Result<(), TrainError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(TrainError::Diverged {
            step,
            what: format!("{what} is {value}"),
            checkpoints: ckpt.into(),
        })
    }
}

impl Trainer {
    pub fn checkpoints(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// Trains `model` with `stage`; returns the trained model (also written to `out/`).
    pub fn run<M: TrainModel, S: Stage<M>>(
        &self,
        model: M,
        stage: &mut S,
    ) -> Result<(M, TrainOutcome), TrainError> {
        let cfg = &self.config;
        let ckpt_root = self.checkpoints();
        std::fs::create_dir_all(&ckpt_root).map_err(io_err(&ckpt_root))?;
        checkpoint::sweep_temporaries(&ckpt_root)?;
        let device = model
            .devices()
            .first()
            .cloned()
            .expect("a model lives on a device");
        let mut opt = AdamW::new(&cfg.optim);
        set_precision(cfg.precision);
        let (mut model, mut state) = if self.resume {
            let dir = checkpoint::latest(&ckpt_root)
                .ok_or_else(|| TrainError::NothingToResume(ckpt_root.clone()))?;
            let (m, s) = checkpoint::load::<M>(&dir, &mut opt, &device)?;
            let m = m.restore_trainable(&cfg.peft)?;
            stage.load_state(&s.stage)?;
            tracing::info!(
                "{}: resuming from {} (step {})",
                self.name,
                dir.display(),
                s.step
            );
            (m, s)
        } else {
            (model, TrainerState::default())
        };
        let metrics = MetricsLog::open(&self.out, self.resume.then_some(state.step))?;
        std::fs::write(self.out.join(checkpoint::RUN_CONFIG_FILE), cfg.to_toml())
            .map_err(io_err(&self.out))?;

        let (total, trainable) = count_params(&model);
        tracing::info!(
            "{}: {} parameters, {} trainable ({:.2}%)",
            self.name,
            total,
            trainable,
            100.0 * trainable as f64 / total.max(1) as f64
        );
        let peak = self
            .peak_gflops
            .unwrap_or_else(crate::perf::mfu_peak_gflops);
        tracing::debug!("{}: mfu against a peak of {peak:.0} GFLOP/s", self.name);
        let flops_per_token =
            crate::perf::train_flops_per_token(model.llama_config(), cfg.data.seq_len);
        let count = FlopCount::new(model.llama_config(), trainable as f64 / total.max(1) as f64);
        let max_steps = cfg.schedule.max_steps;
        let accum = cfg.optim.grad_accum.max(1);

        let bar = (cfg.log.progress && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(max_steps as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta} {msg}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b.set_prefix(self.name.clone());
            b.set_position(state.step as u64);
            b
        });
        let say = |line: String| match &bar {
            Some(b) => b.println(line),
            None => tracing::info!("{line}"),
        };

        let start = Instant::now();
        let elapsed_before = state.elapsed_s;
        let tokens_before = state.tokens;
        let mut window_loss = 0.0f64;
        let mut window_steps = 0usize;
        let mut window_tokens = 0usize;
        let mut window_flops = 0.0f64;
        let mut window_start = Instant::now();
        let mut last_eval = Vec::new();
        let mut interrupted = false;
        let mut steps_this_run = 0usize;
        let (mut run_flops, mut step_secs) = (0.0f64, 0.0f64);

        while state.step < max_steps {
            let step = state.step;
            let step_start = Instant::now();
            let lr = lr_at(step, &cfg.optim, &cfg.schedule);
            let mut acc = GradientsAccumulator::<M>::new();
            let mut step_loss = 0.0f64;
            for micro in 0..accum {
                let scale = 1.0 / accum as f64;
                let tokens = match stage.train_grads(&model, step, micro, scale)? {
                    Some(g) => {
                        finite_or(step, "the loss", g.loss, &ckpt_root)?;
                        step_loss += g.loss;
                        for grads in g.grads {
                            acc.accumulate(&model, grads);
                        }
                        g.tokens
                    }
                    None => {
                        let (loss, tokens) = stage.train_loss(&model, step, micro)?;
                        let loss = loss / accum as f64;
                        let value = kiln_model::to_vec(loss.clone())[0] as f64;
                        finite_or(step, "the loss", value, &ckpt_root)?;
                        step_loss += value;
                        acc.accumulate(
                            &model,
                            GradientsParams::from_grads(loss.backward(), &model),
                        );
                        tokens
                    }
                };
                window_tokens += tokens;
                let flops = stage
                    .flops(&count, step, micro)
                    .unwrap_or(tokens as f64 * flops_per_token);
                window_flops += flops;
                run_flops += flops;
                state.tokens += tokens as u64;
            }
            let (m, gnorm) = opt.step(model, acc.grads(), lr, cfg.optim.grad_clip);
            model = m;
            stage.after_step(step);
            step_secs += step_start.elapsed().as_secs_f64();
            finite_or(step, "the gradient norm", gnorm, &ckpt_root)?;
            state.step += 1;
            state.optimizer_t = opt.t;
            steps_this_run += 1;
            window_loss += step_loss;
            window_steps += 1;
            if let Some(b) = &bar {
                b.set_position(state.step as u64);
                b.set_message(format!("loss {step_loss:.4}"));
            }

            let last = state.step == max_steps;
            if state.step % cfg.log.every.max(1) == 0 || last {
                let secs = window_start.elapsed().as_secs_f64();
                let tok_s = window_tokens as f64 / secs.max(1e-9);
                let mfu = window_flops / secs.max(1e-9) / (peak * 1e9);
                let loss = window_loss / window_steps as f64;
                let extra = stage.log_extra();
                let extra_line: String = extra
                    .iter()
                    .map(|(k, v)| format!(" | {k} {v:.4}"))
                    .collect();
                say(format!(
                    "{} step {}/{} | loss {loss:.4} | lr {lr:.3e} | grad norm {gnorm:.3} | {tok_s:.0} tok/s | mfu {:.1}%{extra_line}",
                    self.name, state.step, max_steps, mfu * 100.0
                ));
                let mut rec = json!({"kind": "train", "stage": self.name, "step": state.step, "loss": loss, "lr": lr,
                    "grad_norm": gnorm, "tok_s": tok_s, "mfu": mfu, "tokens": state.tokens,
                    "step_flops": window_flops / window_steps.max(1) as f64,
                    "elapsed_s": elapsed_before + start.elapsed().as_secs_f64()});
                for (k, v) in extra {
                    rec[k] = json!(v);
                }
                metrics.write(&rec)?;
                window_loss = 0.0;
                window_steps = 0;
                window_tokens = 0;
                window_flops = 0.0;
                window_start = Instant::now();
            }

            let boundary = stage.boundary(state.step);
            let stop_now = boundary
                && (STOP.load(Ordering::SeqCst)
                    || self.stop_after.is_some_and(|n| steps_this_run >= n));
            let eval_now = last || (cfg.eval.every > 0 && state.step % cfg.eval.every == 0);
            let ckpt_now = last
                || stop_now
                || (boundary && cfg.checkpoint.every > 0 && state.step % cfg.checkpoint.every == 0);
            let mut improved = false;
            if eval_now {
                let valid = model.valid();
                last_eval = stage.evaluate(&valid)?;
                let line: Vec<String> = last_eval
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect();
                say(format!(
                    "{} eval step {}: {}",
                    self.name,
                    state.step,
                    line.join(" | ")
                ));
                let mut rec = json!({"kind": "eval", "stage": self.name, "step": state.step});
                for (k, v) in &last_eval {
                    rec[k] = json!(v);
                }
                for s in stage.samples(&valid)? {
                    say(format!("  sample: {}", s.replace('\n', "\\n")));
                }
                metrics.write(&rec)?;
                if let Some((_, v)) = last_eval.first() {
                    if state.best_val.is_none_or(|b| *v < b) {
                        state.best_val = Some(*v);
                        improved = true;
                    }
                }
            }
            if ckpt_now || (improved && boundary) {
                state.elapsed_s = elapsed_before + start.elapsed().as_secs_f64();
                state.stage = stage.state();
                let dir = checkpoint::save(&ckpt_root, &model, &self.tokenizer, &opt, &state, cfg)?;
                if improved {
                    checkpoint::mark_best(&ckpt_root, &dir)?;
                }
                checkpoint::prune(&ckpt_root, cfg.checkpoint.keep_last)?;
            }
            if stop_now && !last {
                say(format!(
                    "{}: stopped at step {}; checkpoint saved, continue with --resume",
                    self.name, state.step
                ));
                interrupted = true;
                break;
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let wall = start.elapsed().as_secs_f64();
        if !interrupted {
            model.save_dir(&self.tokenizer, &self.out)?;
            self.write_plot(metrics.path())?;
        }
        let outcome = TrainOutcome {
            step: state.step,
            interrupted,
            last_eval,
            best_val: state.best_val,
            wall_s: elapsed_before + wall,
            tokens: state.tokens,
            tokens_per_s: (state.tokens - tokens_before) as f64 / wall.max(1e-9),
            params: total,
            trainable_params: trainable,
            flops: run_flops,
            mfu: run_flops / step_secs.max(1e-9) / (peak * 1e9),
        };
        Ok((model, outcome))
    }

    /// `loss.svg`: training loss and the first evaluation metric over steps.
    pub fn write_plot(&self, metrics: &Path) -> Result<(), TrainError> {
        let recs = MetricsLog::read(metrics);
        let train: Vec<(f64, f64)> = recs
            .iter()
            .filter(|r| r["kind"] == "train")
            .filter_map(|r| Some((r["step"].as_f64()?, r["loss"].as_f64()?)))
            .collect();
        let val: Vec<(f64, f64)> = recs
            .iter()
            .filter(|r| r["kind"] == "eval")
            .filter_map(|r| Some((r["step"].as_f64()?, r["val_loss"].as_f64()?)))
            .collect();
        let svg = line_chart(
            &format!("{}: loss", self.name),
            "step",
            &[
                Series {
                    name: "train loss",
                    color: "#1f77b4",
                    points: train,
                },
                Series {
                    name: "val loss",
                    color: "#d62728",
                    points: val,
                },
            ],
        );
        let path = self.out.join("loss.svg");
        std::fs::write(&path, svg).map_err(io_err(&path))?;
        // Reward and KL over iterations, for stages that log them (PPO).
        let series = |kind: &str, key: &str| -> Vec<(f64, f64)> {
            recs.iter()
                .filter(|r| r["kind"] == kind)
                .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
                .collect()
        };
        if recs.iter().any(|r| r["rm_score"].is_f64()) {
            let svg = line_chart(
                &format!("{}: reward", self.name),
                "step",
                &[
                    Series {
                        name: "rm score (rollouts)",
                        color: "#1f77b4",
                        points: series("train", "rm_score"),
                    },
                    Series {
                        name: "gold (rollouts)",
                        color: "#2ca02c",
                        points: series("train", "gold_reward"),
                    },
                    Series {
                        name: "rm score (held out)",
                        color: "#9467bd",
                        points: series("eval", "rm_score"),
                    },
                    Series {
                        name: "gold (held out)",
                        color: "#d62728",
                        points: series("eval", "gold_reward"),
                    },
                ],
            );
            let path = self.out.join("reward.svg");
            std::fs::write(&path, svg).map_err(io_err(&path))?;
            let svg = line_chart(
                &format!("{}: KL to the reference", self.name),
                "step",
                &[
                    Series {
                        name: "KL (rollouts)",
                        color: "#ff7f0e",
                        points: series("train", "kl"),
                    },
                    Series {
                        name: "KL (held out)",
                        color: "#8c564b",
                        points: series("eval", "kl"),
                    },
                ],
            );
            let path = self.out.join("kl.svg");
            std::fs::write(&path, svg).map_err(io_err(&path))?;
        }
        Ok(())
    }
}
