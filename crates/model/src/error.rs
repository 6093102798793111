//! Errors of the model crate: each names the file, tensor or field at fault and both sides of
//! a mismatch.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no model directory at {0}: expected config.json and model.safetensors there (`kiln pretrain --out DIR` writes one)")]
    MissingDir(PathBuf),
    #[error("{path}: malformed config.json: {why}")]
    ConfigParse { path: PathBuf, why: String },
    #[error("config.json: field `{field}`: {why}")]
    Config { field: String, why: String },
    #[error("{path}: not a readable safetensors file: {why}")]
    Safetensors { path: PathBuf, why: String },
    #[error("{path}: tensor `{name}` is missing (the config asks for it)")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}, which Kiln cannot read (F32, F16, BF16 are supported)")]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error(
        "{path}: tensor `{name}` is not used by the model (unexpected in a {arch} checkpoint)"
    )]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        arch: String,
    },
    #[error("tokenizer vocabulary ({tokenizer}) is larger than the model's vocab_size ({model})")]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error("sequence of {len} tokens is longer than the model's context (max_position_embeddings = {max})")]
    TooLong { len: usize, max: usize },
    #[error("token id {id} is outside the model's vocabulary (vocab_size = {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Peft(String),
    #[error(transparent)]
    Tokenizer(#[from] kiln_tokenizer::TokenizerError),
}
