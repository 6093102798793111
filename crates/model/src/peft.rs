//! Parameter-efficient fine-tuning: LoRA (Hu et al. 2021), bottleneck adapters (Houlsby et al.
//! 2019), prefix tuning (Li & Liang 2021) and freezing, each selectable and combinable, on the
//! one [`Llama`] type: the PEFT modules are optional fields of its layers, so every stage, the
//! KV-cache engine and the checkpoint code see one model.
//!
//! LoRA, adapters and the prefix start as the identity or near it: `B = 0` and a zero adapter
//! up-projection give exactly the base model's logits. [`set_trainable`] decides which
//! parameters get gradients (and so optimizer state): the PEFT modules, plus any base parameters
//! that `train` patterns or `train_last_layers` name; with `method = "none"` everything trains.
//!
//! An adapter directory is written in the Hugging Face PEFT layout (`adapter_config.json`,
//! `adapter_model.safetensors` with `base_model.model.<name>.lora_A.weight` names), so `peft`
//! loads a LoRA adapter; see `adapter_dir.rs` for the layout of the others.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::activation::{gelu, tanh};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::layers::Proj;
use crate::llama::Llama;
use crate::rng::Normal;

/// The `[peft]` section of a run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeftConfig {
    /// `none` (full fine-tuning), or one or more of `lora`, `adapter`, `prefix`, `freeze`
    /// joined by `+` or `,` (`freeze` alone trains only the `train` / `train_last_layers` part).
    pub method: String,
    /// LoRA rank r and scale alpha (the update is `alpha / r * x A B`).
    pub lora_r: usize,
    pub lora_alpha: f64,
    /// Dropout on the LoRA input while training (0 keeps resumed runs exact).
    pub lora_dropout: f64,
    /// Projections that get LoRA, by module name (`q_proj`, ..., `down_proj`).
    pub lora_targets: Vec<String>,
    /// Bottleneck width of the adapters.
    pub adapter_size: usize,
    /// Where adapters go: `both`, `attn` or `mlp`.
    pub adapter_placement: String,
    /// Trained key/value positions per layer.
    pub prefix_len: usize,
    /// Hidden width of the MLP that reparameterizes the prefix while training (0 = none).
    pub prefix_hidden: usize,
    /// Base parameters that still train, as patterns over HF names: a substring
    /// (`norm`, `embed_tokens`) or a glob with `*` (`model.layers.*.mlp.*`).
    pub train: Vec<String>,
    /// Train every parameter of the last N decoder layers too.
    pub train_last_layers: usize,
}

impl Default for PeftConfig {
    fn default() -> Self {
        PeftConfig {
            method: "none".into(),
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            adapter_size: 32,
            adapter_placement: "both".into(),
            prefix_len: 16,
            prefix_hidden: 0,
            train: Vec::new(),
            train_last_layers: 0,
        }
    }
}

/// The methods a [`PeftConfig`] turns on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Methods {
    pub lora: bool,
    pub adapter: bool,
    pub prefix: bool,
    pub freeze: bool,
}

impl Methods {
    /// Whether the base model is frozen (all but what `train` names).
    pub fn any(&self) -> bool {
        self.lora || self.adapter || self.prefix || self.freeze
    }
    /// Whether modules are added (so the result is an adapter directory, not a plain model).
    pub fn adds_modules(&self) -> bool {
        self.lora || self.adapter || self.prefix
    }
}

impl PeftConfig {
    pub fn methods(&self) -> Result<Methods, ModelError> {
        let mut m = Methods::default();
        for part in self.method.split(['+', ',']).map(str::trim) {
            match part {
                "none" | "" => {}
                "lora" => m.lora = true,
                "adapter" => m.adapter = true,
                "prefix" => m.prefix = true,
                "freeze" => m.freeze = true,
                other => {
                    return Err(ModelError::Peft(format!(
                        "unknown method `{other}` in peft.method = {:?} (expected none, lora, adapter, prefix, freeze)",
                        self.method
                    )))
                }
            }
        }
        if m.freeze && !m.adds_modules() && self.train.is_empty() && self.train_last_layers == 0 {
            return Err(ModelError::Peft(
                "peft.method = \"freeze\" trains nothing: name what trains with peft.train = [\"norm\", ...] or peft.train_last_layers = N".into(),
            ));
        }
        if !["both", "attn", "mlp"].contains(&self.adapter_placement.as_str()) {
            return Err(ModelError::Peft(format!(
                "peft.adapter_placement = {:?}: expected both, attn or mlp",
                self.adapter_placement
            )));
        }
        for t in &self.lora_targets {
            if !PROJECTIONS.contains(&t.as_str()) {
                return Err(ModelError::Peft(format!(
                    "peft.lora_targets: unknown projection `{t}` (expected some of {})",
                    PROJECTIONS.join(", ")
                )));
            }
        }
        if m.lora && self.lora_r == 0
            || m.adapter && self.adapter_size == 0
            || m.prefix && self.prefix_len == 0
        {
            return Err(ModelError::Peft(
                "peft.lora_r, peft.adapter_size and peft.prefix_len must be at least 1".into(),
            ));
        }
        Ok(m)
    }

    /// Whether base parameter `name` (HF name) of a model with `layers` blocks trains.
    pub fn trains_base(&self, name: &str, layers: usize) -> bool {
        let last = layers.saturating_sub(self.train_last_layers);
        let in_last = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= last && self.train_last_layers > 0);
        in_last || self.train.iter().any(|p| pattern_matches(p, name))
    }
}

pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A substring match, or a glob where `*` matches any run of characters.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

/// The low-rank update of one projection: `scaling * dropout(x) A B`, A `(in, r)`, B `(r, out)`.
#[derive(Module, Debug)]
pub struct Lora {
    pub lora_a: Param<Tensor<2>>,
    pub lora_b: Param<Tensor<2>>,
    pub scaling: f64,
    pub dropout: f64,
}

impl Lora {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // Dropout only where a backward pass can follow (training), as burn's Dropout.
        let x = if self.dropout > 0.0 && x.device().is_autodiff() {
            let keep = 1.0 - self.dropout;
            x.clone() * x.random_like(Distribution::Bernoulli(keep)) / keep
        } else {
            x
        };
        // As one product each over all rows (fused::linear), not one per sequence.
        let down = crate::fused::linear(x, self.lora_a.val(), None);
        crate::fused::linear(down, self.lora_b.val(), None) * self.scaling
    }

    /// The dense update `scaling * A B`, `(in, out)`, for merging.
    pub fn delta(&self) -> Tensor<2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scaling
    }
}

/// A bottleneck adapter: `h + up(gelu(down(h)))`, with `up` zero-initialized.
#[derive(Module, Debug)]
pub struct Adapter {
    pub down: Proj,
    pub up: Proj,
}

impl Adapter {
    pub fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        h.clone() + self.up.forward(gelu(self.down.forward(h, false)), false)
    }
}

/// The prefix MLP of Li & Liang: `Linear(d, hidden) -> tanh -> Linear(hidden, L * 2 * kv_dim)`
/// over a `(P, d)` embedding, as PEFT's `PrefixEncoder` with `prefix_projection`.
#[derive(Module, Debug)]
pub struct PrefixEncoder {
    pub w1: Proj,
    pub w2: Proj,
}

/// Trained keys and values for every layer, `(P, L * 2 * kv_dim)` in PEFT's order (layer-major,
/// then key before value, then head, then head_dim), optionally produced by an MLP.
#[derive(Module, Debug)]
pub struct PrefixTuning {
    pub embedding: Param<Tensor<2>>,
    pub encoder: Option<PrefixEncoder>,
    pub n_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PrefixTuning {
    /// The `(P, L * 2 * kv_dim)` prefix matrix (what PEFT saves as `prompt_embeddings`).
    pub fn matrix(&self) -> Tensor<2> {
        let e = self.embedding.val();
        match &self.encoder {
            Some(enc) => enc.w2.forward(tanh(enc.w1.forward(e, false)), false),
            None => e,
        }
    }

    /// The same prefix with the MLP evaluated once: what inference needs, so decoding does not
    /// rerun the reparameterization at every step.
    pub fn folded(&self) -> PrefixTuning {
        PrefixTuning {
            embedding: Param::from_tensor(self.matrix().detach()),
            encoder: None,
            n_layers: self.n_layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Per layer, keys and values `(1, KV, P, hd)`.
    pub fn layer_kv(&self) -> Vec<(Tensor<4>, Tensor<4>)> {
        let m = self.matrix();
        let p = m.dims()[0];
        let (l, kvh, hd) = (self.n_layers, self.kv_heads, self.head_dim);
        let all = m.reshape([p, l * 2, kvh, hd]).permute([1, 2, 0, 3]); // (L*2, KV, P, hd)
        (0..l)
            .map(|i| {
                (
                    all.clone().slice([2 * i..2 * i + 1, 0..kvh, 0..p, 0..hd]),
                    all.clone()
                        .slice([2 * i + 1..2 * i + 2, 0..kvh, 0..p, 0..hd]),
                )
            })
            .collect()
    }
}

fn normal(rng: &mut Normal, shape: [usize; 2], std: f64, device: &Device) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(rng.sample_vec(shape[0] * shape[1], std as f32), shape),
        device,
    )
}

/// Adds the PEFT modules `config` asks for to `model` (deterministic for `seed`) and marks what
/// trains; `base` is the directory the base model came from (recorded in the adapter). The
/// result gives the base model's logits until it is trained (for the prefix: close
/// to them; a prefix of keys always takes some attention).
pub fn apply(
    model: Llama,
    config: &PeftConfig,
    base: &std::path::Path,
    seed: u64,
) -> Result<Llama, ModelError> {
    let m = config.methods()?;
    let mut model = model;
    model.peft = Some(crate::llama::PeftInfo {
        config: config.clone(),
        base: std::path::absolute(base).unwrap_or_else(|_| base.into()),
    });
    let device = model.device();
    let mut rng = Normal::new(seed ^ 0x9e3779b97f4a7c15);
    let c = model.config.clone();
    let d = c.hidden_size;
    if m.lora {
        let scaling = config.lora_alpha / config.lora_r as f64;
        let r = config.lora_r;
        for layer in model.model.layers.iter_mut() {
            for (path, proj) in layer.projections_mut() {
                let name = path.rsplit('.').next().unwrap_or(path);
                if !config.lora_targets.iter().any(|t| t == name) {
                    continue;
                }
                let [d_in, d_out] = proj.dims();
                // PEFT draws A by kaiming_uniform(a=sqrt(5)): variance 1 / (3 * in).
                let std = (1.0 / (3.0 * d_in as f64)).sqrt();
                proj.lora = Some(Lora {
                    lora_a: Param::from_tensor(normal(&mut rng, [d_in, r], std, &device)),
                    lora_b: Param::from_tensor(Tensor::zeros([r, d_out], &device)),
                    scaling,
                    dropout: config.lora_dropout,
                });
            }
        }
    }
    if m.adapter {
        let size = config.adapter_size;
        let make = |rng: &mut Normal| Adapter {
            down: Proj::new(
                normal(rng, [d, size], 1e-2, &device),
                Some(Tensor::zeros([size], &device)),
            ),
            up: Proj::new(
                Tensor::zeros([size, d], &device),
                Some(Tensor::zeros([d], &device)),
            ),
        };
        for layer in model.model.layers.iter_mut() {
            if config.adapter_placement != "mlp" {
                layer.attn_adapter = Some(make(&mut rng));
            }
            if config.adapter_placement != "attn" {
                layer.mlp_adapter = Some(make(&mut rng));
            }
        }
    }
    if m.prefix {
        let (l, kvh, hd) = (c.num_hidden_layers, c.kv_heads(), c.head_dim());
        let width = l * 2 * kvh * hd;
        let p = config.prefix_len;
        model.prefix = Some(if config.prefix_hidden > 0 {
            let h = config.prefix_hidden;
            PrefixTuning {
                embedding: Param::from_tensor(normal(&mut rng, [p, d], 1.0, &device)),
                encoder: Some(PrefixEncoder {
                    w1: Proj::new(
                        normal(&mut rng, [d, h], (1.0 / d as f64).sqrt(), &device),
                        Some(Tensor::zeros([h], &device)),
                    ),
                    w2: Proj::new(
                        normal(&mut rng, [h, width], c.initializer_range, &device),
                        Some(Tensor::zeros([width], &device)),
                    ),
                }),
                n_layers: l,
                kv_heads: kvh,
                head_dim: hd,
            }
        } else {
            // Keys and values of the size a projection of a unit-RMS hidden state has.
            let std = c.initializer_range * (d as f64).sqrt();
            PrefixTuning {
                embedding: Param::from_tensor(normal(&mut rng, [p, width], std, &device)),
                encoder: None,
                n_layers: l,
                kv_heads: kvh,
                head_dim: hd,
            }
        });
    }
    set_trainable(model, config)
}

/// Marks which parameters of `model` train under `config`: all of them for `none`; otherwise
/// the PEFT modules plus the base parameters `train` / `train_last_layers` name.
pub fn set_trainable(model: Llama, config: &PeftConfig) -> Result<Llama, ModelError> {
    let m = config.methods()?;
    struct Mark<'a> {
        path: Vec<String>,
        config: &'a PeftConfig,
        all: bool,
        layers: usize,
    }
    impl ModuleMapper for Mark<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let name = self.path.join(".");
            let train =
                self.all || is_peft_param(&name) || self.config.trains_base(&name, self.layers);
            param.set_require_grad(train)
        }
    }
    let layers = model.config.num_hidden_layers;
    Ok(model.map(&mut Mark {
        path: Vec::new(),
        config,
        all: !m.any(),
        layers,
    }))
}

/// Whether a parameter path belongs to a PEFT module rather than the base model.
pub fn is_peft_param(path: &str) -> bool {
    path.starts_with("prefix.")
        || path.contains(".lora.")
        || path.contains("attn_adapter.")
        || path.contains("mlp_adapter.")
}

/// Folds every LoRA update into its projection (`W + scaling * A B`) and removes it, so the model
/// is a plain Llama again. Adapters and prefixes are not linear and cannot be folded: an error.
pub fn merge_lora(model: Llama) -> Result<Llama, ModelError> {
    let mut model = model;
    if model.prefix.is_some()
        || model
            .model
            .layers
            .iter()
            .any(|l| l.attn_adapter.is_some() || l.mlp_adapter.is_some())
    {
        return Err(ModelError::Peft(
            "only LoRA can be merged into the weights: bottleneck adapters and prefixes are not linear maps; use the adapter directory as it is".into(),
        ));
    }
    for layer in model.model.layers.iter_mut() {
        for (_, proj) in layer.projections_mut() {
            if let Some(lora) = proj.lora.take() {
                let w = (proj.weight.val() + lora.delta()).detach();
                proj.weight = Param::from_tensor(w);
            }
        }
    }
    model.peft = None;
    Ok(model)
}

/// A model loaded as the starting point of a new stage: an adapter is folded into the weights
/// (LoRA) so the stage starts from one plain model; adapters and prefixes cannot be folded.
pub fn into_base(model: Llama) -> Result<Llama, ModelError> {
    if !model.has_peft_modules() {
        let mut model = model;
        model.peft = None;
        return Ok(model);
    }
    merge_lora(model).map_err(|_| {
        ModelError::Peft(
            "this model is an adapter directory with bottleneck adapters or a prefix, which cannot be folded into the weights; a later stage must start from a LoRA or full model"
                .into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches(
            "norm",
            "model.layers.0.input_layernorm.weight"
        ));
        assert!(pattern_matches(
            "model.layers.*.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!pattern_matches(
            "model.layers.*.mlp.*",
            "model.layers.3.self_attn.q_proj.weight"
        ));
        assert!(pattern_matches("*.weight", "model.norm.weight"));
        assert!(!pattern_matches("*.bias", "model.norm.weight"));
        let c = PeftConfig {
            train_last_layers: 1,
            ..Default::default()
        };
        assert!(c.trains_base("model.layers.3.mlp.up_proj.weight", 4));
        assert!(!c.trains_base("model.layers.2.mlp.up_proj.weight", 4));
        assert!(!c.trains_base("model.norm.weight", 4));
    }

    #[test]
    fn method_errors_say_what_to_do() {
        let bad = PeftConfig {
            method: "lora+qlora".into(),
            ..Default::default()
        };
        assert!(bad
            .methods()
            .unwrap_err()
            .to_string()
            .contains("unknown method `qlora`"));
        let nothing = PeftConfig {
            method: "freeze".into(),
            ..Default::default()
        };
        assert!(nothing
            .methods()
            .unwrap_err()
            .to_string()
            .contains("trains nothing"));
        let both = PeftConfig {
            method: "lora, prefix".into(),
            ..Default::default()
        };
        let m = both.methods().unwrap();
        assert!(m.lora && m.prefix && !m.adapter && !m.freeze);
    }
}
