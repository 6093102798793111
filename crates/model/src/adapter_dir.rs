//! Adapter directories: what a PEFT run writes instead of a whole model.
//!
//! - `adapter_config.json`: Hugging Face PEFT's config (`peft_type`, `base_model_name_or_path`,
//!   and for LoRA `r`, `lora_alpha`, `target_modules`; for a prefix `num_virtual_tokens`, ...),
//!   and beside it `kiln_peft.json`, Kiln's whole `[peft]` section.
//! - `adapter_model.safetensors`: PEFT tensor names and layouts. LoRA:
//!   `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` `(r, in)` and `lora_B`
//!   `(out, r)`; a prefix: `prompt_embeddings` `(P, L * 2 * kv_dim)`. Bottleneck adapters have no
//!   PEFT type; Kiln names them `base_model.model.model.layers.0.attn_adapter.down.weight` (HF
//!   `[out, in]` layout) and marks the directory `peft_type: "KILN"`.
//! - `kiln_peft.safetensors` (only when needed): what training needs beyond the adapter: the
//!   prefix MLP before reparameterization, and base parameters trained alongside (by HF name).
//! - the tokenizer files, so the directory is usable on its own next to its base.
//!
//! A LoRA-only or prefix-only directory loads in `peft`; a LoRA directory written by `peft`
//! loads here.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::json;

use crate::checkpoint::{
    host, llama_tensors, load_llama, push_proj, safetensors_bytes, transpose, write_atomic,
    TensorFile,
};
use crate::error::ModelError;
use crate::layers::Proj;
use crate::llama::{Llama, PeftInfo};
use crate::peft::{self, PeftConfig};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const KILN_PEFT_FILE: &str = "kiln_peft.safetensors";
pub const KILN_PEFT_CONFIG_FILE: &str = "kiln_peft.json";
const PREFIX: &str = "base_model.model.";

type Named = Vec<(String, Vec<usize>, Vec<f32>)>;

pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).exists()
}

/// The projections of layer `i` with their HF module paths.
fn projections(model: &Llama, i: usize) -> Vec<(String, &Proj)> {
    model.model.layers[i]
        .projections()
        .into_iter()
        .map(|(path, p)| (format!("model.layers.{i}.{path}"), p))
        .collect()
}

/// The adapter's tensors (PEFT names) and the training-only extras.
fn adapter_tensors(model: &Llama, config: &PeftConfig) -> (Named, Named) {
    let mut main = Named::new();
    let mut extra = Named::new();
    for (i, layer) in model.model.layers.iter().enumerate() {
        for (name, proj) in projections(model, i) {
            if let Some(lora) = &proj.lora {
                let (s, a) = host(lora.lora_a.val()); // (in, r)
                main.push((
                    format!("{PREFIX}{name}.lora_A.weight"),
                    vec![s[1], s[0]],
                    transpose(&a, s[0], s[1]),
                ));
                let (s, b) = host(lora.lora_b.val()); // (r, out)
                main.push((
                    format!("{PREFIX}{name}.lora_B.weight"),
                    vec![s[1], s[0]],
                    transpose(&b, s[0], s[1]),
                ));
            }
        }
        for (which, ad) in [
            ("attn_adapter", &layer.attn_adapter),
            ("mlp_adapter", &layer.mlp_adapter),
        ] {
            if let Some(ad) = ad {
                let p = format!("{PREFIX}model.layers.{i}.{which}");
                push_proj(&mut main, &format!("{p}.down"), &ad.down);
                push_proj(&mut main, &format!("{p}.up"), &ad.up);
            }
        }
    }
    if let Some(prefix) = &model.prefix {
        let (s, m) = host(prefix.matrix());
        main.push(("prompt_embeddings".into(), s, m));
        if let Some(enc) = &prefix.encoder {
            let (s, e) = host(prefix.embedding.val());
            extra.push(("prefix.embedding".into(), s, e));
            push_proj(&mut extra, "prefix.encoder.w1", &enc.w1);
            push_proj(&mut extra, "prefix.encoder.w2", &enc.w2);
        }
    }
    let layers = model.config.num_hidden_layers;
    extra.extend(
        llama_tensors(model)
            .into_iter()
            .filter(|(n, _, _)| config.trains_base(n, layers)),
    );
    (main, extra)
}

fn adapter_config_json(model: &Llama, info: &PeftInfo) -> Result<serde_json::Value, ModelError> {
    let c = &info.config;
    let m = c.methods()?;
    let base = info.base.display().to_string();
    let mc = &model.config;
    let j = if m.lora && !m.adapter && !m.prefix {
        json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": c.lora_r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
            "target_modules": c.lora_targets, "bias": "none", "fan_in_fan_out": false,
            "inference_mode": true, "init_lora_weights": true, "modules_to_save": null,
            "use_rslora": false, "use_dora": false,
        })
    } else if m.prefix && !m.adapter && !m.lora {
        json!({
            "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "num_virtual_tokens": c.prefix_len, "num_layers": mc.num_hidden_layers,
            "token_dim": mc.kv_heads() * mc.head_dim(), "num_attention_heads": mc.kv_heads(),
            "num_transformer_submodules": 1, "encoder_hidden_size": mc.hidden_size,
            "prefix_projection": false, "inference_mode": true,
        })
    } else {
        json!({"peft_type": "KILN", "task_type": "CAUSAL_LM", "base_model_name_or_path": base})
    };
    Ok(j)
}

/// Writes the adapter of `model` (which must carry [`PeftInfo`]) into `dir`.
pub fn save_adapter(model: &Llama, dir: &Path) -> Result<(), ModelError> {
    let info = model
        .peft
        .as_ref()
        .ok_or_else(|| ModelError::Peft("the model has no PEFT modules to save".into()))?;
    let (main, extra) = adapter_tensors(model, &info.config);
    write_atomic(&dir.join(ADAPTER_WEIGHTS_FILE), &safetensors_bytes(&main))?;
    let extra_path = dir.join(KILN_PEFT_FILE);
    if extra.is_empty() {
        if extra_path.exists() {
            std::fs::remove_file(&extra_path).map_err(|e| ModelError::Io {
                path: extra_path.clone(),
                source: e,
            })?;
        }
    } else {
        write_atomic(&extra_path, &safetensors_bytes(&extra))?;
    }
    let cfg = adapter_config_json(model, info)?;
    write_atomic(
        &dir.join(KILN_PEFT_CONFIG_FILE),
        serde_json::to_string_pretty(&info.config)
            .expect("json")
            .as_bytes(),
    )?;
    write_atomic(
        &dir.join(ADAPTER_CONFIG_FILE),
        serde_json::to_string_pretty(&cfg).expect("json").as_bytes(),
    )
}

/// Reads `adapter_config.json`: Kiln's `[peft]` section (from `kiln_peft.json`, or rebuilt from
/// a LoRA config written by `peft`) and the base model path.
pub fn read_adapter_config(dir: &Path) -> Result<(PeftConfig, PathBuf), ModelError> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
        path: path.clone(),
        source: e,
    })?;
    let bad = |why: String| ModelError::ConfigParse {
        path: path.clone(),
        why,
    };
    let j: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let base = PathBuf::from(j["base_model_name_or_path"].as_str().unwrap_or_default());
    let kiln = dir.join(KILN_PEFT_CONFIG_FILE);
    if kiln.exists() {
        let text = std::fs::read_to_string(&kiln).map_err(|e| ModelError::Io {
            path: kiln.clone(),
            source: e,
        })?;
        let c: PeftConfig = serde_json::from_str(&text).map_err(|e| ModelError::ConfigParse {
            path: kiln.clone(),
            why: e.to_string(),
        })?;
        return Ok((c, base));
    }
    match j["peft_type"].as_str() {
        Some("LORA") => {
            for flag in ["use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"] {
                if j[flag].as_bool() == Some(true) {
                    return Err(bad(format!("{flag} = true is not supported")));
                }
            }
            for key in ["rank_pattern", "alpha_pattern"] {
                if j[key].as_object().is_some_and(|o| !o.is_empty()) {
                    return Err(bad(format!("per-module `{key}` is not supported")));
                }
            }
            for key in ["layers_to_transform", "modules_to_save", "target_parameters"] {
                if !j[key].is_null() {
                    return Err(bad(format!("`{key}` is not supported (found {})", j[key])));
                }
            }
            let targets: Vec<String> = match &j["target_modules"] {
                serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
                other => return Err(bad(format!("target_modules must be a list of projection names, found {other}"))),
            };
            let c = PeftConfig {
                method: "lora".into(),
                lora_r: j["r"].as_u64().ok_or_else(|| bad("missing `r`".into()))? as usize,
                lora_alpha: j["lora_alpha"].as_f64().unwrap_or(8.0),
                lora_dropout: j["lora_dropout"].as_f64().unwrap_or(0.0),
                lora_targets: targets,
                ..Default::default()
            };
            c.methods()?;
            Ok((c, base))
        }
        other => Err(bad(format!(
            "peft_type {other:?} without Kiln's kiln_peft.json: only LoRA adapters written by `peft` are read"
        ))),
    }
}

fn take2(
    file: &mut TensorFile,
    name: &str,
    hf: [usize; 2],
    device: &Device,
) -> Result<Tensor<2>, ModelError> {
    let data = file.take(name, &hf)?;
    Ok(Tensor::from_data(
        TensorData::new(transpose(&data, hf[0], hf[1]), [hf[1], hf[0]]),
        device,
    ))
}

fn take1(
    file: &mut TensorFile,
    name: &str,
    n: usize,
    device: &Device,
) -> Result<Tensor<1>, ModelError> {
    Ok(Tensor::from_data(
        TensorData::new(file.take(name, &[n])?, [n]),
        device,
    ))
}

fn load_into_proj(
    file: &mut TensorFile,
    prefix: &str,
    proj: &mut Proj,
    device: &Device,
) -> Result<(), ModelError> {
    let [d_in, d_out] = proj.dims();
    proj.weight = Param::from_tensor(take2(
        file,
        &format!("{prefix}.weight"),
        [d_out, d_in],
        device,
    )?);
    if proj.bias.is_some() {
        proj.bias = Some(Param::from_tensor(take1(
            file,
            &format!("{prefix}.bias"),
            d_out,
            device,
        )?));
    }
    Ok(())
}

/// Applies the adapter in `dir` to `base` (loaded from `base_path`).
pub fn load_adapter(base: Llama, base_path: &Path, dir: &Path) -> Result<Llama, ModelError> {
    let (config, _) = read_adapter_config(dir)?;
    let device = base.device();
    let mut model = peft::apply(base, &config, base_path, 0)?;
    let mut file = TensorFile::read(&dir.join(ADAPTER_WEIGHTS_FILE))?;
    let extra_path = dir.join(KILN_PEFT_FILE);
    let mut extra = if extra_path.exists() {
        Some(TensorFile::read(&extra_path)?)
    } else {
        None
    };
    let n_layers = model.model.layers.len();
    for i in 0..n_layers {
        let layer = &mut model.model.layers[i];
        for (path, proj) in layer.projections_mut() {
            let name = format!("model.layers.{i}.{path}");
            if let Some(lora) = &mut proj.lora {
                let [d_in, r] = lora.lora_a.shape().dims();
                let d_out = lora.lora_b.shape().dims::<2>()[1];
                lora.lora_a = Param::from_tensor(take2(
                    &mut file,
                    &format!("{PREFIX}{name}.lora_A.weight"),
                    [r, d_in],
                    &device,
                )?);
                lora.lora_b = Param::from_tensor(take2(
                    &mut file,
                    &format!("{PREFIX}{name}.lora_B.weight"),
                    [d_out, r],
                    &device,
                )?);
            }
        }
        for (which, ad) in [
            ("attn_adapter", &mut layer.attn_adapter),
            ("mlp_adapter", &mut layer.mlp_adapter),
        ] {
            if let Some(ad) = ad {
                let p = format!("{PREFIX}model.layers.{i}.{which}");
                load_into_proj(&mut file, &format!("{p}.down"), &mut ad.down, &device)?;
                load_into_proj(&mut file, &format!("{p}.up"), &mut ad.up, &device)?;
            }
        }
    }
    if let Some(prefix) = &mut model.prefix {
        let width = prefix.n_layers * 2 * prefix.kv_heads * prefix.head_dim;
        let p = config.prefix_len;
        let matrix = file.take("prompt_embeddings", &[p, width])?;
        match (
            &mut prefix.encoder,
            extra.as_mut().filter(|e| e.contains("prefix.embedding")),
        ) {
            (Some(enc), Some(ex)) => {
                let d = prefix.embedding.shape().dims::<2>()[1];
                prefix.embedding = Param::from_tensor(Tensor::from_data(
                    TensorData::new(ex.take("prefix.embedding", &[p, d])?, [p, d]),
                    &device,
                ));
                load_into_proj(ex, "prefix.encoder.w1", &mut enc.w1, &device)?;
                load_into_proj(ex, "prefix.encoder.w2", &mut enc.w2, &device)?;
            }
            _ => {
                // The reparameterization is a training device; its output is the prefix.
                prefix.encoder = None;
                prefix.embedding = Param::from_tensor(Tensor::from_data(
                    TensorData::new(matrix, [p, width]),
                    &device,
                ));
            }
        }
    }
    file.finish("PEFT adapter", |_| false)?;
    if let Some(mut ex) = extra {
        // Base parameters trained alongside the adapter replace the base's.
        if !ex.tensors.is_empty() {
            model = replace_base_tensors(model, &mut ex)?;
        }
        ex.finish("Kiln PEFT extras", |_| false)?;
    }
    peft::set_trainable(model, &config)
}

/// Replaces the base parameters named in `file` (HF names and layouts).
fn replace_base_tensors(model: Llama, file: &mut TensorFile) -> Result<Llama, ModelError> {
    let mut tensors = llama_tensors(&model);
    for (name, shape, data) in tensors.iter_mut() {
        if file.contains(name) {
            *data = file.take(name, shape)?;
        }
    }
    let mut tf = TensorFile {
        path: file.path.clone(),
        tensors: tensors.into_iter().map(|(n, s, d)| (n, (s, d))).collect(),
    };
    let device = model.device();
    let fresh = crate::checkpoint::llama_from_tensors(&model.config, &mut tf, &device)?;
    // Keep the PEFT modules; take the (possibly replaced) base weights.
    let mut model = model;
    for (dst, src) in model.model.layers.iter_mut().zip(fresh.model.layers) {
        dst.input_layernorm = src.input_layernorm;
        dst.post_attention_layernorm = src.post_attention_layernorm;
        let pairs = [
            (&mut dst.self_attn.q_proj, src.self_attn.q_proj),
            (&mut dst.self_attn.k_proj, src.self_attn.k_proj),
            (&mut dst.self_attn.v_proj, src.self_attn.v_proj),
            (&mut dst.self_attn.o_proj, src.self_attn.o_proj),
            (&mut dst.mlp.gate_proj, src.mlp.gate_proj),
            (&mut dst.mlp.up_proj, src.mlp.up_proj),
            (&mut dst.mlp.down_proj, src.mlp.down_proj),
        ];
        for (d, s) in pairs {
            d.weight = s.weight;
            d.bias = s.bias;
        }
    }
    model.model.embed_tokens = fresh.model.embed_tokens;
    model.model.norm = fresh.model.norm;
    model.lm_head = fresh.lm_head;
    Ok(model)
}

/// The base model directory an adapter applies to: as recorded, or else relative to the adapter.
pub fn resolve_base(dir: &Path, recorded: &Path) -> Result<PathBuf, ModelError> {
    let is_model = |p: &Path| p.join(crate::checkpoint::CONFIG_FILE).exists() || is_adapter_dir(p);
    if is_model(recorded) {
        return Ok(recorded.into());
    }
    let beside = dir.join(recorded);
    if is_model(&beside) {
        return Ok(beside);
    }
    Err(ModelError::Peft(format!(
        "adapter {} applies to the base model {}, which is not there (move it back, or give the base with `kiln merge --model BASE --adapter {}`)",
        dir.display(),
        recorded.display(),
        dir.display()
    )))
}

/// Loads a plain model directory, or an adapter directory on top of its base. The base may
/// itself be a LoRA adapter directory (a reward model's LoRA over an SFT LoRA, say): it is loaded
/// and merged first.
pub fn load_any(dir: &Path, device: &Device) -> Result<Llama, ModelError> {
    load_chain(dir, device, 0)
}

fn load_chain(dir: &Path, device: &Device, depth: usize) -> Result<Llama, ModelError> {
    if !is_adapter_dir(dir) {
        return load_llama(dir, device);
    }
    if depth > 8 {
        return Err(ModelError::Peft(format!(
            "{}: adapters over adapters more than 8 deep (a cycle in base_model_name_or_path?)",
            dir.display()
        )));
    }
    let (_, recorded) = read_adapter_config(dir)?;
    let base_path = resolve_base(dir, &recorded)?;
    let base = crate::peft::into_base(load_chain(&base_path, device, depth + 1)?)?;
    load_adapter(base, &base_path, dir)
}
