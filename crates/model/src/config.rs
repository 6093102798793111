//! The model configuration, read from and written to a Hugging Face `config.json`.
//!
//! Field names are `transformers`' `LlamaConfig` names so that the file is the same file on both
//! sides. The rope base is read from the top-level `rope_theta` (what most published checkpoints
//! carry) or from `rope_parameters.rope_theta` (what transformers 5 writes); Kiln writes both.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::ModelError;

/// Architecture of a Llama-family decoder (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: heads of keys/values; equal to `num_attention_heads` for MHA.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Explicit head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o projections (Llama's flag). Qwen2 checkpoints carry q/k/v biases
    /// without this flag; those are detected from the weights themselves.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_arch")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Everything else in the file, kept so that a load→save round trip loses nothing.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// transformers 5's `rope_parameters` block; only the default rope type is supported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `eos_token_id` may be one id or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_arch() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}
fn default_init_range() -> f64 {
    0.02
}

impl LlamaConfig {
    /// A config with Llama defaults for the given shape.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        max_len: usize,
    ) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: Some(hidden_size / heads),
            max_position_embeddings: max_len,
            rms_norm_eps: 1e-5,
            rope_theta: Some(10000.0),
            rope_parameters: None,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: default_act(),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            architectures: default_arch(),
            model_type: default_model_type(),
            initializer_range: 0.02,
            extra: Default::default(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Number of parameters of the model this config describes.
    pub fn num_params(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim(),
            self.kv_heads() * self.head_dim(),
        );
        let attn = d * q
            + 2 * d * kv
            + q * d
            + if self.attention_bias {
                q + 2 * kv + d
            } else {
                0
            };
        let mlp = 3 * d * f + if self.mlp_bias { 2 * f + d } else { 0 };
        let layer = attn + mlp + 2 * d;
        v * d
            + self.num_hidden_layers * layer
            + d
            + if self.tie_word_embeddings { 0 } else { v * d }
    }

    /// Checks that the shape is one Kiln can build; the error says which field is wrong.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, why: String| {
            Err(ModelError::Config {
                field: field.into(),
                why,
            })
        };
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return bad(name, "must be positive".into());
            }
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads = {}",
                    self.num_attention_heads
                ),
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size = {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} must be even for rotary embeddings", self.head_dim()),
            );
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("{:?} is not supported (only \"silu\")", self.hidden_act),
            );
        }
        if let Some(rp) = &self.rope_parameters {
            if let Some(t) = rp.rope_type.as_deref() {
                if t != "default" {
                    return bad(
                        "rope_parameters.rope_type",
                        format!("{t:?} is not supported (only \"default\")"),
                    );
                }
            }
        }
        if let Some(scaling) = self.extra.get("rope_scaling") {
            if !scaling.is_null() {
                return bad("rope_scaling", format!("{scaling} is not supported"));
            }
        }
        Ok(())
    }

    /// Reads `config.json`; a missing file or a malformed one is an error naming the file.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.into(),
            source: e,
        })?;
        let config: LlamaConfig =
            serde_json::from_str(&text).map_err(|e| ModelError::ConfigParse {
                path: path.into(),
                why: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The JSON Kiln writes: HF names, the rope base in both places transformers reads it from.
    pub fn to_json(&self) -> String {
        let mut c = self.clone();
        let theta = c.rope_theta();
        c.rope_theta = Some(theta);
        c.head_dim = Some(c.head_dim());
        c.num_key_value_heads = Some(c.kv_heads());
        let mut value = serde_json::to_value(&c).expect("config serializes");
        let obj = value.as_object_mut().expect("config is an object");
        obj.retain(|_, v| !v.is_null());
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": theta, "rope_type": "default"}),
        );
        obj.entry("torch_dtype").or_insert("float32".into());
        serde_json::to_string_pretty(&value).expect("config serializes")
    }
}
