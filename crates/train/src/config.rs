//! The run configuration: one TOML file with `[model]`, `[data]`, `[optim]`, `[schedule]`,
//! `[eval]`, `[checkpoint]`, `[log]`, `[ppo]` and `[peft]` sections. Defaults < file < `--set key=value`; unknown
//! keys are errors in both the file and the overrides. The resolved config is saved beside every
//! checkpoint.

use serde::{Deserialize, Serialize};

use crate::TrainError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Vocabulary of the tokenizer trained when none is given.
    pub vocab_size: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        // The `tiny` shape: 4 layers, d=256 (~3.4M parameters with a 4k tied vocabulary).
        ModelSection {
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            vocab_size: 4096,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Tokens per training sequence (at most max_position_embeddings).
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Share of the token stream held out for validation (the last part, as nanoGPT).
    pub val_fraction: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            seq_len: 256,
            batch_size: 16,
            val_fraction: 0.1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub lr: f64,
    /// Learning rate at the end of the decay.
    pub min_lr: f64,
    /// Decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 2e-3,
            min_lr: 2e-4,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            grad_accum: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    pub warmup_steps: usize,
    pub max_steps: usize,
    pub decay: Decay,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection {
            warmup_steps: 50,
            max_steps: 1000,
            decay: Decay::Cosine,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every N steps (and at the end); 0 = only at the end.
    pub every: usize,
    /// Validation batches per evaluation.
    pub batches: usize,
    /// Sample completions printed per evaluation.
    pub samples: usize,
    pub sample_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 200,
            batches: 8,
            samples: 2,
            sample_tokens: 40,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    pub every: usize,
    /// Checkpoints kept besides the best one.
    pub keep_last: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            every: 250,
            keep_last: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// One log line (and metrics.jsonl record) every N steps.
    pub every: usize,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            every: 10,
            progress: true,
        }
    }
}

/// PPO settings (used by `kiln ppo` only). In PPO, `--max-steps`, `eval.every` and
/// `checkpoint.every` count iterations; each iteration takes `epochs * minibatches` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoSection {
    /// Prompts sampled (and answers generated) per iteration.
    pub prompts_per_iter: usize,
    pub max_new_tokens: usize,
    /// Sampling temperature of rollouts.
    pub temperature: f64,
    /// Passes over each iteration's rollouts.
    pub epochs: usize,
    /// Minibatches per pass.
    pub minibatches: usize,
    /// Policy-ratio clip ε.
    pub clip: f64,
    /// Value clip around the rollout's values.
    pub vf_clip: f64,
    pub vf_coef: f64,
    /// Entropy bonus coefficient.
    pub ent_coef: f64,
    /// GAE discount γ and λ.
    pub gamma: f64,
    pub lam: f64,
    /// Initial (or fixed) KL penalty β.
    pub kl_coef: f64,
    /// Adapt β toward `target_kl` (Ziegler et al. 2019); false keeps it fixed.
    pub adaptive_kl: bool,
    pub target_kl: f64,
    pub kl_horizon: f64,
    /// γ_ptx: weight of the pre-training language-modeling loss (InstructGPT's PPO-ptx); 0 = plain PPO.
    pub ptx_coef: f64,
    /// Pre-training sequences per minibatch for the ptx term, and their length.
    pub ptx_batch: usize,
    pub ptx_seq_len: usize,
    /// Whiten reward-model scores over each rollout batch.
    pub whiten_rewards: bool,
    /// Clip reward-model scores to ±this (0 = off).
    pub reward_clip: f64,
    /// Held-out prompts evaluated at each evaluation.
    pub eval_prompts: usize,
    /// The critic: `reward_model` (a separate model initialized from the reward model, as
    /// InstructGPT) or `policy_head` (a value head on the policy's hidden states: less memory).
    pub critic: String,
    /// Where the rollout's old log-probabilities come from: `recompute` (a forward pass over
    /// the rollout, the update's own, so the first ratio is exactly 1) or `generation` (the
    /// sampler's, as TRL does: one forward pass less per iteration; the first ratio is then 1
    /// only within the decoding kernels' rounding, and within bf16 rounding at bf16 precision).
    pub old_logprobs: OldLogprobs,
}

/// [`PpoSection::old_logprobs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OldLogprobs {
    #[default]
    Recompute,
    Generation,
}

impl Default for PpoSection {
    fn default() -> Self {
        PpoSection {
            prompts_per_iter: 32,
            max_new_tokens: 24,
            temperature: 1.0,
            epochs: 2,
            minibatches: 2,
            clip: 0.2,
            vf_clip: 0.2,
            vf_coef: 0.1,
            ent_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            kl_coef: 0.05,
            adaptive_kl: true,
            target_kl: 4.0,
            kl_horizon: 10000.0,
            ptx_coef: 0.5,
            ptx_batch: 4,
            ptx_seq_len: 64,
            whiten_rewards: false,
            reward_clip: 10.0,
            eval_prompts: 64,
            critic: "reward_model".into(),
            old_logprobs: OldLogprobs::Recompute,
        }
    }
}

impl PpoSection {
    /// The shapes of TRL's CPU PPO benchmark (`../shared/bench/trl/bench_ppo.py`): 64 prompts,
    /// 32 response tokens, 4 epochs x 4 minibatches, no pre-training term. What `kiln bench
    /// --what ppo_trl` and the PPO examples run.
    pub fn trl_benchmark_shapes(&mut self) {
        self.prompts_per_iter = 64;
        self.max_new_tokens = 32;
        self.epochs = 4;
        self.minibatches = 4;
        self.ptx_coef = 0.0;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    /// Precision of the linear layers' matrix products: `f32`, or `bf16` (inputs rounded to
    /// bf16, sums in f32; weights, gradients and optimizer state stay f32). bf16 runs about 2x
    /// faster per product on a CPU with AVX512-BF16 and falls back to f32 elsewhere.
    pub precision: kiln_model::fused::MatmulPrecision,
    pub model: ModelSection,
    pub data: DataSection,
    pub optim: OptimSection,
    pub schedule: ScheduleSection,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
    pub log: LogSection,
    pub ppo: PpoSection,
    /// Parameter-efficient fine-tuning: LoRA, adapters, prefix, freezing (sft, reward, ppo).
    pub peft: kiln_model::peft::PeftConfig,
}

/// Presets shipped in `configs/` and compiled in, so `--config tiny` works anywhere.
pub const PRESETS: [(&str, &str); 6] = [
    ("ppo", include_str!("../../../configs/ppo.toml")),
    ("reward", include_str!("../../../configs/reward.toml")),
    ("sft", include_str!("../../../configs/sft.toml")),
    ("tiny", include_str!("../../../configs/tiny.toml")),
    ("small", include_str!("../../../configs/small.toml")),
    ("test", include_str!("../../../configs/test.toml")),
];

impl TrainConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, TrainError> {
        toml::from_str(text).map_err(|e| TrainError::Config(format!("{origin}: {e}")))
    }

    /// A preset name (`tiny`, `small`, `test`) or a path to a TOML file.
    pub fn load(name_or_path: &str) -> Result<Self, TrainError> {
        if let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name_or_path) {
            return Self::from_toml(text, name_or_path);
        }
        let text = std::fs::read_to_string(name_or_path).map_err(|e| {
            TrainError::Config(format!("{name_or_path}: {e} (not a file, and not a preset: tiny, small, test, sft, reward, ppo)"))
        })?;
        Self::from_toml(&text, name_or_path)
    }

    /// Applies `section.key=value` overrides; an unknown key or a value of the wrong type is an
    /// error that lists what was expected.
    pub fn apply_overrides(&mut self, sets: &[String]) -> Result<(), TrainError> {
        if sets.is_empty() {
            return Ok(());
        }
        let mut root =
            toml::Value::try_from(&*self).map_err(|e| TrainError::Config(e.to_string()))?;
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| {
                TrainError::Config(format!(
                    "--set {set:?}: expected key=value, e.g. optim.lr=3e-4"
                ))
            })?;
            let key = key.trim();
            let value = value.trim();
            let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
                Ok(mut t) => t.remove("v").expect("key v"),
                Err(_) => toml::Value::String(value.to_string()),
            };
            let mut node = &mut root;
            let parts: Vec<&str> = key.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let table = node.as_table_mut().ok_or_else(|| {
                    TrainError::Config(format!(
                        "--set {key}: {} is not a section",
                        parts[..i].join(".")
                    ))
                })?;
                if !table.contains_key(*part) {
                    let mut known: Vec<&String> = table.keys().collect();
                    known.sort();
                    let known: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
                    return Err(TrainError::Config(format!(
                        "--set {key}: unknown key `{part}`; known here: {}",
                        known.join(", ")
                    )));
                }
                if i + 1 == parts.len() {
                    table.insert(part.to_string(), parsed.clone());
                    break;
                }
                node = table.get_mut(*part).expect("checked");
            }
        }
        *self = root
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(format!("--set: {e}")))?;
        Ok(())
    }

    /// The model of `[model]` with the tokenizer's vocabulary and special tokens.
    pub fn llama_config(&self, tk: &kiln_tokenizer::Tokenizer) -> kiln_model::LlamaConfig {
        let m = &self.model;
        let mut cfg = kiln_model::LlamaConfig::new(
            tk.vocab_size(),
            m.hidden_size,
            m.intermediate_size,
            m.num_hidden_layers,
            m.num_attention_heads,
            m.num_key_value_heads,
            m.max_position_embeddings,
        );
        cfg.tie_word_embeddings = m.tie_word_embeddings;
        cfg.bos_token_id = tk.bos_id();
        cfg.eos_token_id = tk.eos_id().map(kiln_model::config::TokenIds::One);
        cfg.pad_token_id = tk.pad_id();
        cfg
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_overrides_apply() {
        for (name, _) in PRESETS {
            TrainConfig::load(name).unwrap();
        }
        let mut c = TrainConfig::load("tiny").unwrap();
        c.apply_overrides(&[
            "optim.lr=3e-4".into(),
            "schedule.decay=linear".into(),
            "seed=7".into(),
        ])
        .unwrap();
        assert_eq!(c.optim.lr, 3e-4);
        assert_eq!(c.schedule.decay, Decay::Linear);
        assert_eq!(c.seed, 7);
        let back = TrainConfig::from_toml(&c.to_toml(), "roundtrip").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let mut c = TrainConfig::default();
        let e = c
            .apply_overrides(&["optim.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lrr") && e.contains("known here") && e.contains("lr,"),
            "{e}"
        );
        let e = c
            .apply_overrides(&["optim.lr=fast".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lr") || e.contains("float"), "{e}");
        let e = TrainConfig::from_toml("[optim]\nlearning_rate = 1.0\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("learning_rate"), "{e}");
    }
}
