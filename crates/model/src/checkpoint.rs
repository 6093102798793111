//! Hugging Face model directories: `config.json` + `model.safetensors` (+ `generation_config.json`),
//! with HF tensor names and layouts, so `transformers` loads what Kiln saves and Kiln loads what
//! `transformers` saved.
//!
//! Loading is strict: every tensor the config implies must be present with its exact shape, and
//! a tensor the model would not use is an error (except the `rotary_emb.inv_freq` buffers older
//! checkpoints carry). F16 and BF16 weights are widened to f32.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::layers::{Attention, DecoderLayer, Mlp, Proj, RmsNorm};
use crate::llama::{Embedding, Llama, LlamaModel};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Tensors read from a safetensors file, f32, HF layout, by name.
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
            path: path.into(),
            source: e,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
            path: path.into(),
            why: e.to_string(),
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                // Integer tensors (token ids in test fixtures) are read as exact small floats.
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect(),
                Dtype::I32 => data
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32)
                    .collect(),
                other => {
                    return Err(ModelError::TensorDtype {
                        path: path.into(),
                        name,
                        dtype: format!("{other:?}"),
                    })
                }
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(TensorFile {
            path: path.into(),
            tensors,
        })
    }

    /// Removes and returns tensor `name` as `expected` (HF layout); errors name both shapes.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        let (shape, data) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })?;
        if shape != expected {
            return Err(ModelError::TensorShape {
                path: self.path.clone(),
                name: name.into(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(data)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Errors on the first tensor no one took, ignoring the names `ignore` accepts.
    pub fn finish(self, arch: &str, ignore: impl Fn(&str) -> bool) -> Result<(), ModelError> {
        let mut left: Vec<&String> = self.tensors.keys().filter(|n| !ignore(n)).collect();
        left.sort();
        match left.first() {
            Some(name) => Err(ModelError::UnexpectedTensor {
                path: self.path.clone(),
                name: (*name).clone(),
                arch: arch.into(),
            }),
            None => Ok(()),
        }
    }
}

/// A matrix from HF's `[out, in]` to burn's `[in, out]`.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

fn load_linear(
    file: &mut TensorFile,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Result<Linear, ModelError> {
    let p = load_proj(file, prefix, d_in, d_out, bias, device)?;
    Ok(Linear {
        weight: p.weight,
        bias: p.bias,
    })
}

fn load_proj(
    file: &mut TensorFile,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Result<Proj, ModelError> {
    let w = file.take(&format!("{prefix}.weight"), &[d_out, d_in])?;
    let weight = Tensor::<2>::from_data(
        TensorData::new(transpose(&w, d_out, d_in), [d_in, d_out]),
        device,
    );
    let bias = if bias {
        let b = file.take(&format!("{prefix}.bias"), &[d_out])?;
        Some(Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(b, [d_out]),
            device,
        )))
    } else {
        None
    };
    Ok(Proj {
        weight: Param::from_tensor(weight),
        bias,
        lora: None,
    })
}

fn load_norm(
    file: &mut TensorFile,
    name: &str,
    d: usize,
    eps: f64,
    device: &Device,
) -> Result<RmsNorm, ModelError> {
    let w = file.take(name, &[d])?;
    Ok(RmsNorm {
        weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [d]), device)),
        eps,
    })
}

/// Builds a [`Llama`] from HF-named tensors. Q/K/V biases are taken when the config says so
/// (`attention_bias`) or the file has them (Qwen2-style checkpoints).
pub fn llama_from_tensors(
    config: &LlamaConfig,
    file: &mut TensorFile,
    device: &Device,
) -> Result<Llama, ModelError> {
    config.validate()?;
    let (v, d, f) = (
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
    );
    let (q, kv) = (
        config.num_attention_heads * config.head_dim(),
        config.kv_heads() * config.head_dim(),
    );
    let eps = config.rms_norm_eps;
    let embed = file.take("model.embed_tokens.weight", &[v, d])?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let qkv_bias =
            config.attention_bias || file.contains(&format!("{p}.self_attn.q_proj.bias"));
        let o_bias = config.attention_bias || file.contains(&format!("{p}.self_attn.o_proj.bias"));
        let mb = config.mlp_bias;
        layers.push(DecoderLayer {
            input_layernorm: load_norm(
                file,
                &format!("{p}.input_layernorm.weight"),
                d,
                eps,
                device,
            )?,
            self_attn: Attention {
                q_proj: load_proj(
                    file,
                    &format!("{p}.self_attn.q_proj"),
                    d,
                    q,
                    qkv_bias,
                    device,
                )?,
                k_proj: load_proj(
                    file,
                    &format!("{p}.self_attn.k_proj"),
                    d,
                    kv,
                    qkv_bias,
                    device,
                )?,
                v_proj: load_proj(
                    file,
                    &format!("{p}.self_attn.v_proj"),
                    d,
                    kv,
                    qkv_bias,
                    device,
                )?,
                o_proj: load_proj(file, &format!("{p}.self_attn.o_proj"), q, d, o_bias, device)?,
                n_heads: config.num_attention_heads,
                n_kv_heads: config.kv_heads(),
                head_dim: config.head_dim(),
            },
            post_attention_layernorm: load_norm(
                file,
                &format!("{p}.post_attention_layernorm.weight"),
                d,
                eps,
                device,
            )?,
            attn_adapter: None,
            mlp_adapter: None,
            mlp: Mlp {
                gate_proj: load_proj(file, &format!("{p}.mlp.gate_proj"), d, f, mb, device)?,
                up_proj: load_proj(file, &format!("{p}.mlp.up_proj"), d, f, mb, device)?,
                down_proj: load_proj(file, &format!("{p}.mlp.down_proj"), f, d, mb, device)?,
            },
        });
    }
    let norm = load_norm(file, "model.norm.weight", d, eps, device)?;
    let lm_head = if config.tie_word_embeddings {
        file.tensors.remove("lm_head.weight"); // some tied checkpoints store the copy anyway
        None
    } else {
        Some(load_linear(file, "lm_head", d, v, false, device)?)
    };
    Ok(Llama {
        model: LlamaModel {
            embed_tokens: Embedding {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(embed, [v, d]),
                    device,
                )),
            },
            layers,
            norm,
        },
        lm_head,
        prefix: None,
        config: config.clone(),
        peft: None,
    })
}

/// Loads `DIR/config.json` and `DIR/model.safetensors` as a causal LM.
pub fn load_llama(dir: &Path, device: &Device) -> Result<Llama, ModelError> {
    if !dir.join(CONFIG_FILE).exists() {
        return Err(ModelError::MissingDir(dir.into()));
    }
    let config = LlamaConfig::load(&dir.join(CONFIG_FILE))?;
    let mut file = TensorFile::read(&dir.join(WEIGHTS_FILE))?;
    let model = llama_from_tensors(&config, &mut file, device)?;
    file.finish("LlamaForCausalLM", |n| n.ends_with("rotary_emb.inv_freq"))?;
    Ok(model)
}

/// A tensor as f32 values and its shape.
pub fn host(t: Tensor<2>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    (dims, t.try_into_vec_as::<f32>().expect("f32 tensor"))
}
pub fn host1(t: Tensor<1>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    (dims, t.try_into_vec_as::<f32>().expect("f32 tensor"))
}

/// Appends a linear layer's tensors in HF layout.
pub fn push_linear(out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, prefix: &str, linear: &Linear) {
    push_weights(
        out,
        prefix,
        linear.weight.val(),
        linear.bias.as_ref().map(|b| b.val()),
    );
}

/// Appends a projection's base weight and bias in HF layout (LoRA is not part of the base).
pub fn push_proj(out: &mut Vec<(String, Vec<usize>, Vec<f32>)>, prefix: &str, proj: &Proj) {
    push_weights(
        out,
        prefix,
        proj.weight.val(),
        proj.bias.as_ref().map(|b| b.val()),
    );
}

/// Appends `prefix.weight` (a burn `[in, out]` matrix, written `[out, in]`) and `prefix.bias`.
pub fn push_weights(
    out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
    prefix: &str,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) {
    let (shape, w) = host(weight);
    out.push((
        format!("{prefix}.weight"),
        vec![shape[1], shape[0]],
        transpose(&w, shape[0], shape[1]),
    ));
    if let Some(b) = bias {
        let (shape, b) = host1(b);
        out.push((format!("{prefix}.bias"), shape, b));
    }
}

/// The model's tensors with their HF names, shapes and layouts.
pub fn llama_tensors(model: &Llama) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    let (s, e) = host(model.model.embed_tokens.weight.val());
    out.push(("model.embed_tokens.weight".into(), s, e));
    for (i, layer) in model.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let (s, w) = host1(layer.input_layernorm.weight.val());
        out.push((format!("{p}.input_layernorm.weight"), s, w));
        let (s, w) = host1(layer.post_attention_layernorm.weight.val());
        out.push((format!("{p}.post_attention_layernorm.weight"), s, w));
        for (path, proj) in layer.projections() {
            push_proj(&mut out, &format!("{p}.{path}"), proj);
        }
    }
    let (s, w) = host1(model.model.norm.weight.val());
    out.push(("model.norm.weight".into(), s, w));
    if let Some(head) = &model.lm_head {
        push_linear(&mut out, "lm_head", head);
    }
    out
}

/// Serializes named f32 tensors to safetensors bytes with `{"format": "pt"}` metadata, which
/// `transformers` requires.
pub fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = bytes.iter().map(|(n, s, d)| {
        (
            n.clone(),
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), d).expect("sizes match"),
        )
    });
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).expect("safetensors serialization")
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, so a crash
/// leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let io = |e| ModelError::Io {
        path: path.into(),
        source: e,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes the model's `config.json`, `model.safetensors` and `generation_config.json` into `dir`.
pub fn save_llama(model: &Llama, dir: &Path) -> Result<(), ModelError> {
    write_atomic(
        &dir.join(WEIGHTS_FILE),
        &safetensors_bytes(&llama_tensors(model)),
    )?;
    write_atomic(&dir.join(CONFIG_FILE), model.config.to_json().as_bytes())?;
    let mut gen = serde_json::json!({"_from_model_config": true});
    if let Some(b) = model.config.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if let Some(e) = &model.config.eos_token_id {
        gen["eos_token_id"] = serde_json::to_value(e).expect("ids serialize");
    }
    if let Some(p) = model.config.pad_token_id {
        gen["pad_token_id"] = p.into();
    }
    write_atomic(
        &dir.join(GENERATION_CONFIG_FILE),
        serde_json::to_string_pretty(&gen).expect("json").as_bytes(),
    )
}
