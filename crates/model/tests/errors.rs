//! Every bad input to model loading is an error that names the problem (and both sides of a
//! mismatch), never a panic.

use std::path::{Path, PathBuf};

use kiln_model::checkpoint::{llama_tensors, load_llama, safetensors_bytes, TensorFile};
use kiln_model::{default_device, LlamaConfig, ModelDir};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_gqa")
}

fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn err(dir: &Path) -> String {
    load_llama(dir, &default_device())
        .expect_err("load must fail")
        .to_string()
}

#[test]
fn missing_directory_says_what_is_expected() {
    let e = err(Path::new("/nonexistent/model"));
    assert!(
        e.contains("/nonexistent/model") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn malformed_config_names_the_file() {
    let dir = copy_fixture();
    std::fs::write(dir.path().join("config.json"), "{\"vocab_size\": 96,").unwrap();
    let e = err(dir.path());
    assert!(e.contains("config.json") && e.contains("malformed"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{\"vocab_size\": 96}").unwrap();
    let e = err(dir.path());
    assert!(e.contains("hidden_size"), "{e}");
}

#[test]
fn invalid_config_field_is_named() {
    let dir = copy_fixture();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["num_key_value_heads"] = 3.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = err(dir.path());
    assert!(e.contains("num_key_value_heads") && e.contains("3"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture();
    let mut file = TensorFile::read(&dir.path().join("model.safetensors")).unwrap();
    file.tensors.remove("model.layers.1.mlp.up_proj.weight");
    let mut t: Vec<_> = file
        .tensors
        .into_iter()
        .map(|(k, (s, d))| (k, s, d))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(dir.path().join("model.safetensors"), safetensors_bytes(&t)).unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = copy_fixture();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["intermediate_size"] = 80.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("gate_proj.weight") && e.contains("[80, 32]") && e.contains("[64, 32]"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = copy_fixture();
    let model = load_llama(dir.path(), &default_device()).unwrap();
    let mut t = llama_tensors(&model);
    t.push((
        "model.layers.7.extra.weight".into(),
        vec![2],
        vec![0.0, 1.0],
    ));
    std::fs::write(dir.path().join("model.safetensors"), safetensors_bytes(&t)).unwrap();
    let e = err(dir.path());
    assert!(e.contains("model.layers.7.extra.weight"), "{e}");
}

#[test]
fn truncated_weights_file_is_an_error() {
    let dir = copy_fixture();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("safetensors"),
        "{e}"
    );
}

#[test]
fn tokenizer_larger_than_vocab_names_both_sizes() {
    let dir = copy_fixture();
    // A tokenizer of 300+ tokens against a model of 96.
    let corpus = dir.path().join("c.txt");
    std::fs::write(
        &corpus,
        "some words to learn from, and some more words. ".repeat(50),
    )
    .unwrap();
    let tk = kiln_tokenizer::Tokenizer::train(&[corpus], 300).unwrap();
    tk.save(dir.path(), None).unwrap();
    let e = ModelDir::load(dir.path(), &default_device())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&tk.vocab_size().to_string()) && e.contains("96"),
        "{e}"
    );
    // And a directory without a tokenizer says how to make one.
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = ModelDir::load(dir.path(), &default_device())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("kiln tokenizer train"),
        "{e}"
    );
}

#[test]
fn rope_theta_read_from_either_place() {
    let text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let cfg: LlamaConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg.rope_theta(), 10000.0); // transformers 5: rope_parameters.rope_theta
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("rope_parameters");
    v["rope_theta"] = 500000.0.into();
    let cfg: LlamaConfig = serde_json::from_value(v).unwrap();
    assert_eq!(cfg.rope_theta(), 500000.0); // top-level, as most published checkpoints
}
