//! Golden tests against `transformers` (fixtures written by tools/golden/make_llama_fixtures.py):
//! logits, loss, padded-batch logits and gradients of tiny random Llama models, and the model
//! directory round trip.

use std::path::{Path, PathBuf};

use kiln_model::burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_model::checkpoint::{load_llama, save_llama, TensorFile};
use kiln_model::{cross_entropy, default_device, ForwardInput, Llama};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Golden {
    ids: Vec<Vec<u32>>,
    logits: (Vec<usize>, Vec<f32>),
    loss: f32,
    pad_mask: Vec<Vec<bool>>,
    pad_logits: Vec<f32>,
    file: TensorFile,
}

fn golden(name: &str) -> Golden {
    let mut file = TensorFile::read(&fixture(name).join("golden.safetensors")).unwrap();
    let (ids_shape, ids) = file.tensors.remove("input_ids").unwrap();
    let rows: Vec<Vec<u32>> = ids
        .chunks(ids_shape[1])
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let (_, mask) = file.tensors.remove("pad_mask").unwrap();
    let pad_mask = mask
        .chunks(ids_shape[1])
        .map(|r| r.iter().map(|&x| x > 0.5).collect())
        .collect();
    let logits = file.tensors.remove("logits").unwrap();
    let loss = file.tensors.remove("loss").unwrap().1[0];
    let pad_logits = file.tensors.remove("pad_logits").unwrap().1;
    Golden {
        ids: rows,
        logits,
        loss,
        pad_mask,
        pad_logits,
        file,
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Loss of next-token prediction on `ids`, as HF computes it with `labels = input_ids`.
fn lm_loss(model: &Llama, ids: &[Vec<u32>], device: &Device) -> Tensor<1> {
    let logits = model.forward(&ForwardInput::causal(ids, device), None);
    let [b, t, v] = logits.dims();
    let logits = logits.slice([0..b, 0..t - 1, 0..v]);
    let targets: Vec<i64> = ids
        .iter()
        .flat_map(|r| r[1..].iter().map(|&x| x as i64))
        .collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b, t - 1]), device);
    cross_entropy(logits, targets, Tensor::ones([b, t - 1], device))
}

fn check_logits_and_loss(name: &str) {
    let device = default_device();
    let model = load_llama(&fixture(name), &device).unwrap();
    let g = golden(name);
    let logits = to_vec(model.forward(&ForwardInput::causal(&g.ids, &device), None));
    let d = max_diff(&logits, &g.logits.1);
    println!(
        "{name}: logits max abs diff {d:.2e}; first {:?} vs {:?}",
        &logits[..3],
        &g.logits.1[..3]
    );
    assert!(d < 1e-4, "{name}: logits differ by {d}");
    let loss = to_vec(lm_loss(&model, &g.ids, &device))[0];
    println!("{name}: loss {loss} vs transformers {}", g.loss);
    assert!(
        (loss - g.loss).abs() < 1e-5,
        "{name}: loss {loss} vs {}",
        g.loss
    );

    // Left-padded batch: compare real positions only (padding queries are meaningless).
    let padded = to_vec(model.forward(&ForwardInput::padded(&g.ids, &g.pad_mask, &device), None));
    let v = model.config.vocab_size;
    let t = g.ids[0].len();
    let mut worst = 0.0f32;
    for (b, row) in g.pad_mask.iter().enumerate() {
        for (j, &ok) in row.iter().enumerate() {
            if ok {
                let o = (b * t + j) * v;
                worst = worst.max(max_diff(&padded[o..o + v], &g.pad_logits[o..o + v]));
            }
        }
    }
    println!("{name}: padded logits max abs diff {worst:.2e}");
    assert!(worst < 1e-4, "{name}: padded logits differ by {worst}");
}

#[test]
fn golden_gqa() {
    check_logits_and_loss("llama_gqa");
}

#[test]
fn golden_tied_embeddings() {
    check_logits_and_loss("llama_tied");
}

#[test]
fn golden_attention_bias() {
    check_logits_and_loss("llama_bias");
}

/// Kiln's gradients of the loss equal PyTorch's (HF layout: linear weights are `[out, in]`).
#[test]
fn gradients_match_pytorch() {
    let device = default_device().autodiff();
    let model = load_llama(&fixture("llama_gqa"), &device).unwrap();
    let mut g = golden("llama_gqa");
    let loss = lm_loss(&model, &g.ids, &device);
    let grads = loss.backward();
    let layer0 = &model.model.layers[0];
    let layer1 = &model.model.layers[1];
    let t = |x: Tensor<2>| x.transpose();
    let ours: Vec<(&str, Vec<f32>)> = vec![
        (
            "model.embed_tokens.weight",
            to_vec(model.model.embed_tokens.weight.val().grad(&grads).unwrap()),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            to_vec(t(layer0
                .self_attn
                .q_proj
                .weight
                .val()
                .grad(&grads)
                .unwrap())),
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            to_vec(t(layer0
                .self_attn
                .k_proj
                .weight
                .val()
                .grad(&grads)
                .unwrap())),
        ),
        (
            "model.layers.1.mlp.down_proj.weight",
            to_vec(t(layer1.mlp.down_proj.weight.val().grad(&grads).unwrap())),
        ),
        (
            "model.layers.1.input_layernorm.weight",
            to_vec(layer1.input_layernorm.weight.val().grad(&grads).unwrap()),
        ),
        (
            "model.norm.weight",
            to_vec(model.model.norm.weight.val().grad(&grads).unwrap()),
        ),
    ];
    for (name, grad) in ours {
        let (_, expected) = g.file.tensors.remove(&format!("grad.{name}")).unwrap();
        let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let d = max_diff(&grad, &expected);
        println!("{name}: max |grad| {scale:.3e}, max abs diff {d:.2e}");
        assert!(
            d <= 1e-4 * scale.max(1e-3),
            "{name}: gradient differs by {d} (scale {scale})"
        );
    }
}

/// A model Kiln saves loads back bit-identically, with HF's tensor names and shapes.
#[test]
fn save_load_is_identity() {
    let device = default_device();
    for name in ["llama_gqa", "llama_tied", "llama_bias"] {
        let model = load_llama(&fixture(name), &device).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_llama(&model, dir.path()).unwrap();
        let back = load_llama(dir.path(), &device).unwrap();
        let ids = vec![vec![1u32, 5, 9, 3, 7]];
        let a = to_vec(model.forward(&ForwardInput::causal(&ids, &device), None));
        let b = to_vec(back.forward(&ForwardInput::causal(&ids, &device), None));
        assert_eq!(a, b, "{name}: logits changed across save/load");
        // Same tensor names and shapes as the file transformers wrote.
        let mut ours: Vec<(String, Vec<usize>)> =
            TensorFile::read(&dir.path().join("model.safetensors"))
                .unwrap()
                .tensors
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
        let mut theirs: Vec<(String, Vec<usize>)> =
            TensorFile::read(&fixture(name).join("model.safetensors"))
                .unwrap()
                .tensors
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
        ours.sort();
        theirs.sort();
        assert_eq!(
            ours, theirs,
            "{name}: tensor names/shapes differ from transformers'"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(cfg["rope_theta"], 10000.0);
        assert_eq!(cfg["rope_parameters"]["rope_theta"], 10000.0);
    }
}

/// With `KILN_EXPORT_DIR` set, writes a Kiln-saved model and Kiln's logits there for
/// tools/golden/check_kiln_dir.py to compare with transformers.
#[test]
#[ignore = "an export for tools/golden/check_kiln_dir.py, not a check: KILN_EXPORT_DIR=DIR cargo test -p kiln-model -- --ignored kiln_dir_for_transformers"]
fn kiln_dir_for_transformers() {
    let out =
        std::env::var("KILN_EXPORT_DIR").expect("set KILN_EXPORT_DIR to the directory to write");
    let device = default_device();
    let mut config = kiln_model::LlamaConfig::new(300, 48, 96, 2, 6, 2, 64);
    config.tie_word_embeddings = true;
    let model = Llama::init(&config, 7, &device).unwrap();
    let out = Path::new(&out);
    let corpus = out.with_extension("txt");
    std::fs::write(
        &corpus,
        "hello world, the tokenizer learns a few merges here. ".repeat(20),
    )
    .unwrap();
    let tk = kiln_tokenizer::Tokenizer::train(&[corpus], 300).unwrap();
    kiln_model::ModelDir::save(&model, &tk, out).unwrap();
    let ids = vec![vec![3u32, 17, 99, 4, 42, 8, 0, 299]];
    let logits = to_vec(model.forward(&ForwardInput::causal(&ids, &device), None));
    let logits: Vec<Vec<Vec<f32>>> = vec![logits.chunks(300).map(|c| c.to_vec()).collect()];
    let expected = serde_json::json!({"input_ids": ids, "logits": logits});
    std::fs::write(out.join("expected.json"), expected.to_string()).unwrap();
}
