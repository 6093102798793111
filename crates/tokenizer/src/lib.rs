//! Kiln's tokenizer: byte-level BPE through Hugging Face's `tokenizers` crate, the special tokens
//! chat needs, and the files that go into a model directory (`tokenizer.json`,
//! `tokenizer_config.json` with the special tokens and the chat template).
//!
//! Any HF `tokenizer.json` loads. Knows no tensors.

pub mod chat;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerImpl,
};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

pub const BOS: &str = "<|bos|>";
pub const EOS: &str = "<|eos|>";
pub const PAD: &str = "<|pad|>";
/// Role markers of Kiln's chat format.
pub const ROLES: [&str; 3] = ["<|system|>", "<|user|>", "<|assistant|>"];

/// Kiln's default chat template (Jinja, as in `tokenizer_config.json`). Every turn ends with the
/// EOS token, so a model trained on it learns to stop after its answer.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("no tokenizer at {0}; run `kiln tokenizer train --input FILE --out DIR` to make one")]
    Missing(PathBuf),
    #[error("{path}: {why}")]
    Load { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer training failed: {0}")]
    Train(String),
    #[error("tokenizer: {0}")]
    Other(String),
}

/// A tokenizer and its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
}

/// A special token in `tokenizer_config.json` is a string or `{"content": ...}`.
fn token_field(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (and `tokenizer_config.json` beside it, if present) from a file or
    /// a model directory.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let (file, dir) = if path.is_dir() {
            (path.join(TOKENIZER_FILE), path.to_path_buf())
        } else {
            (
                path.to_path_buf(),
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            )
        };
        if !file.exists() {
            return Err(TokenizerError::Missing(file));
        }
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
            path: file.clone(),
            why: e.to_string(),
        })?;
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| TokenizerError::Io {
                path: cfg_path.clone(),
                source: e,
            })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Load {
                path: cfg_path.clone(),
                why: e.to_string(),
            })?
        } else {
            json!({})
        };
        let known = |name: &str| inner.token_to_id(name).map(|_| name.to_string());
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(Tokenizer {
            bos_token: token_field(&config, "bos_token").or_else(|| known(BOS)),
            eos_token: token_field(&config, "eos_token").or_else(|| known(EOS)),
            pad_token: token_field(&config, "pad_token").or_else(|| known(PAD)),
            chat_template,
            inner,
        })
    }

    /// Trains byte-level BPE on text files with Kiln's special tokens (ids 0..6).
    pub fn train(files: &[PathBuf], vocab_size: usize) -> Result<Self, TokenizerError> {
        for f in files {
            if !f.exists() {
                return Err(TokenizerError::Missing(f.clone()));
            }
        }
        let specials = special_tokens();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                specials
                    .iter()
                    .map(|s| AddedToken::from(s.to_string(), true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
            .build();
        let mut tk: TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerImpl::new(BPE::default());
        tk.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, true,
        ))));
        tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        let names: Vec<String> = files
            .iter()
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        tk.train_from_files(&mut trainer, names)
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        let inner: tokenizers::Tokenizer = tk.into();
        Ok(Tokenizer {
            inner,
            bos_token: Some(BOS.into()),
            eos_token: Some(EOS.into()),
            pad_token: Some(PAD.into()),
            chat_template: Some(DEFAULT_CHAT_TEMPLATE.into()),
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path, model_max_length: Option<usize>) -> Result<(), TokenizerError> {
        std::fs::create_dir_all(dir).map_err(|e| TokenizerError::Io {
            path: dir.into(),
            source: e,
        })?;
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| TokenizerError::Other(e.to_string()))?;
        write(&dir.join(TOKENIZER_FILE), json.as_bytes())?;
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "add_bos_token": false,
            "add_eos_token": false,
        });
        for (key, value) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = value {
                config[key] = json!(v);
            }
        }
        config["chat_template"] = json!(self
            .chat_template
            .clone()
            .unwrap_or_else(|| DEFAULT_CHAT_TEMPLATE.into()));
        if let Some(n) = model_max_length {
            config["model_max_length"] = json!(n);
        }
        write(
            &dir.join(TOKENIZER_CONFIG_FILE),
            serde_json::to_string_pretty(&config)
                .expect("json")
                .as_bytes(),
        )
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Token ids of `text`; special-token strings inside it are recognized as special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Other(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `encode` with the BOS token in front when the tokenizer has one.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids: Vec<u32> = self.bos_id().into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Other(e.to_string()))
    }
}

/// Kiln's special tokens, in id order.
pub fn special_tokens() -> Vec<&'static str> {
    let mut v = vec![BOS, EOS, PAD];
    v.extend(ROLES);
    v
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), TokenizerError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| TokenizerError::Io {
            path: path.into(),
            source: e,
        })
}

/// Turns a growing list of generated ids into text pieces as they become printable: a byte-level
/// token can end inside a UTF-8 character, so text is only emitted up to the last complete one.
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the newly printable text, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(dir: &Path) -> PathBuf {
        let path = dir.join("corpus.txt");
        let mut text = String::new();
        let sentences = [
            "The quick brown fox jumps over the lazy dog.",
            "A red ball sits on the green table in the kitchen.",
            "Alice has three apples and Bob has four oranges.",
            "The children walked to the market and bought fresh bread.",
            "Every morning the baker opens the shop at seven o'clock.",
        ];
        for i in 0..400 {
            text.push_str(sentences[i % sentences.len()]);
            text.push_str(if i % 3 == 0 { "\n\n" } else { " " });
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn roundtrip_unicode_and_compression() {
        let dir = tempfile::tempdir().unwrap();
        let file = corpus(dir.path());
        let tk = Tokenizer::train(std::slice::from_ref(&file), 512).unwrap();
        assert_eq!(tk.token_id(BOS), Some(0));
        assert_eq!(tk.token_id(EOS), Some(1));
        for text in [
            "héllo wörld — ñandú 🦀 日本語のテキスト",
            "  leading spaces\tand\nnewlines  ",
            "The quick brown fox.",
        ] {
            let ids = tk.encode(text).unwrap();
            assert_eq!(tk.decode(&ids, false).unwrap(), text);
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let ids = tk.encode(&text).unwrap();
        let ratio = text.len() as f64 / ids.len() as f64;
        assert!(ratio > 2.5, "bytes/token = {ratio}");
    }

    #[test]
    fn save_load_keeps_specials_and_template() {
        let dir = tempfile::tempdir().unwrap();
        let file = corpus(dir.path());
        let tk = Tokenizer::train(&[file], 300).unwrap();
        let out = dir.path().join("tok");
        tk.save(&out, Some(128)).unwrap();
        let back = Tokenizer::load(&out).unwrap();
        assert_eq!(back.eos_id(), tk.eos_id());
        assert_eq!(back.pad_id(), tk.pad_id());
        assert_eq!(back.chat_template.as_deref(), Some(DEFAULT_CHAT_TEMPLATE));
        let ids = back.encode("<|user|>\nhi<|eos|>").unwrap();
        assert_eq!(ids[0], back.token_id("<|user|>").unwrap());
        assert_eq!(*ids.last().unwrap(), back.eos_id().unwrap());
    }

    #[test]
    fn missing_tokenizer_says_how_to_make_one() {
        let err = Tokenizer::load(Path::new("/nonexistent/dir/tokenizer.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("/nonexistent/dir/tokenizer.json") && err.contains("kiln tokenizer train"),
            "{err}"
        );
    }

    #[test]
    fn stream_decoder_never_splits_characters() {
        let dir = tempfile::tempdir().unwrap();
        let tk = Tokenizer::train(&[corpus(dir.path())], 300).unwrap();
        let text = "naïve café 🦀 fox";
        let ids = tk.encode(text).unwrap();
        let mut s = StreamDecoder::new();
        let mut out = String::new();
        for id in ids {
            out.push_str(&s.push(&tk, id).unwrap());
        }
        assert_eq!(out, text);
    }
}
