//! The reward model: the Llama body with a scalar head read at the last non-padding token,
//! saved as a Hugging Face `LlamaForSequenceClassification` directory (`num_labels: 1`,
//! `score.weight`), so `transformers` loads it and produces the same scores.
//!
//! After training, Kiln shifts rewards so that the starting (SFT) model's responses score 0 on
//! average, as PPO expects; the shift is recorded in config.json as `kiln_reward_offset`
//! (subtracted by Kiln's scoring; `transformers` returns the raw score).

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

use crate::checkpoint::{
    llama_from_tensors, llama_tensors, safetensors_bytes, write_atomic, TensorFile, CONFIG_FILE,
    WEIGHTS_FILE,
};
use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::llama::Llama;

pub const ARCHITECTURE: &str = "LlamaForSequenceClassification";
pub const OFFSET_KEY: &str = "kiln_reward_offset";
/// Where a reward model trained with LoRA keeps its unmerged adapter.
pub const ADAPTER_SUBDIR: &str = "adapter";

#[derive(Module, Debug)]
pub struct RewardModel {
    /// The decoder; its language-model head is not used (and not kept).
    pub base: Llama,
    /// `[d, 1]`: HF's `score.weight` (`[1, d]`) transposed.
    pub score: Linear,
    #[module(skip)]
    pub offset: f64,
}

impl RewardModel {
    /// A reward model from a causal LM: the same body and a small random scalar head.
    pub fn from_llama(mut base: Llama, seed: u64) -> Self {
        let device = base.device();
        let d = base.config.hidden_size;
        base.lm_head = None;
        let w = crate::rng::Normal::new(seed ^ 0x5c0e)
            .sample_vec(d, (1.0 / d as f64).sqrt() as f32 * 0.1);
        let score = Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, 1]), &device)),
            bias: None,
        };
        base.config.architectures = vec![ARCHITECTURE.into()];
        RewardModel {
            base,
            score,
            offset: 0.0,
        }
    }

    /// Raw scores (before the offset) of `rows`, each read at its last valid token: `(B,)`.
    /// Rows may be padded anywhere; `valid[b][t]` marks real tokens.
    pub fn forward(&self, rows: &[Vec<u32>], valid: &[Vec<bool>]) -> Tensor<1> {
        let b = rows.len();
        // Packed without padding (`Packing`): the same scores, in fewer token slots when the
        // rows' lengths differ.
        let packing = self.base.packing(rows, valid);
        let last: Vec<usize> = valid
            .iter()
            .enumerate()
            .map(|(i, v)| packing.index(i, v.iter().rposition(|&x| x).unwrap_or(0)))
            .collect();
        // The last layer runs its output projection and feed-forward block at those tokens only.
        let hidden = self.base.hidden_at(&packing.input, &last); // (B, d)
        self.score.forward(hidden).reshape([b])
    }

    /// Scores of unpadded sequences of different lengths, right-padded into one batch, with the
    /// offset applied.
    pub fn score(&self, seqs: &[Vec<u32>]) -> Vec<f32> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(1);
        let rows: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| {
                let mut r = s.clone();
                r.resize(t, 0);
                r
            })
            .collect();
        let valid: Vec<Vec<bool>> = seqs
            .iter()
            .map(|s| (0..t).map(|j| j < s.len()).collect())
            .collect();
        crate::to_vec(self.forward(&rows, &valid))
            .into_iter()
            .map(|x| x - self.offset as f32)
            .collect()
    }

    /// Writes the `LlamaForSequenceClassification` directory. A body trained with LoRA is
    /// saved merged (what `transformers` loads), and its adapter also goes to `dir/adapter/`
    /// so that training resumes on the unmerged weights ([`RewardModel::load_for_training`]).
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let adapter = dir.join(ADAPTER_SUBDIR);
        let merged;
        let body = if self.base.has_peft_modules() {
            crate::adapter_dir::save_adapter(&self.base, &adapter)?;
            merged = crate::peft::merge_lora(self.base.clone())?;
            &merged
        } else {
            if adapter.exists() {
                std::fs::remove_dir_all(&adapter).map_err(|e| ModelError::Io {
                    path: adapter.clone(),
                    source: e,
                })?;
            }
            &self.base
        };
        let mut tensors: Vec<_> = llama_tensors(body);
        let d = self.base.config.hidden_size;
        tensors.push((
            "score.weight".into(),
            vec![1, d],
            crate::to_vec(self.score.weight.val()),
        ));
        write_atomic(&dir.join(WEIGHTS_FILE), &safetensors_bytes(&tensors))?;
        let mut config = self.base.config.clone();
        config.architectures = vec![ARCHITECTURE.into()];
        config.extra.insert("num_labels".into(), 1.into());
        config
            .extra
            .insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        config
            .extra
            .insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        config.extra.insert(OFFSET_KEY.into(), self.offset.into());
        write_atomic(&dir.join(CONFIG_FILE), config.to_json().as_bytes())
    }

    /// Loads a checkpoint to continue training: as [`RewardModel::load`], but a body trained
    /// with LoRA comes back unmerged, from `dir/adapter/` over its base.
    pub fn load_for_training(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let mut rm = Self::load(dir, device)?;
        let adapter = dir.join(ADAPTER_SUBDIR);
        if adapter.exists() {
            let mut body = crate::adapter_dir::load_any(&adapter, device)?;
            body.lm_head = None;
            body.config = rm.base.config.clone();
            rm.base = body;
        }
        Ok(rm)
    }

    /// Loads a `LlamaForSequenceClassification` directory with one label.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        if !dir.join(CONFIG_FILE).exists() {
            return Err(ModelError::MissingDir(dir.into()));
        }
        let mut config = LlamaConfig::load(&dir.join(CONFIG_FILE))?;
        if let Some(n) = config.extra.get("num_labels").and_then(|v| v.as_u64()) {
            if n != 1 {
                return Err(ModelError::Config {
                    field: "num_labels".into(),
                    why: format!("{n}: a reward model has exactly one label"),
                });
            }
        }
        let offset = config
            .extra
            .get(OFFSET_KEY)
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        let path = dir.join(WEIGHTS_FILE);
        let mut file = TensorFile::read(&path)?;
        let d = config.hidden_size;
        let w = file.take("score.weight", &[1, d])?;
        // The body: no LM head in a sequence-classification checkpoint.
        config.tie_word_embeddings = true;
        let mut base = llama_from_tensors(&config, &mut file, device)?;
        file.finish(ARCHITECTURE, |n| n.ends_with("rotary_emb.inv_freq"))?;
        base.config.tie_word_embeddings = false;
        let score = Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, 1]), device)),
            bias: None,
        };
        Ok(RewardModel {
            base,
            score,
            offset,
        })
    }
}
