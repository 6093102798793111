//! A complete Hugging Face model directory: the model plus its tokenizer.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use kiln_tokenizer::{Tokenizer, TOKENIZER_FILE};

use crate::adapter_dir::{is_adapter_dir, load_any, save_adapter};
use crate::checkpoint::{save_llama, CONFIG_FILE};
use crate::error::ModelError;
use crate::llama::Llama;

pub struct ModelDir {
    pub path: PathBuf,
    pub model: Llama,
    pub tokenizer: Tokenizer,
}

impl ModelDir {
    /// Loads model and tokenizer from `dir`, checking that every token id the tokenizer can
    /// produce has a row in the embedding.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let adapter = is_adapter_dir(dir);
        if !adapter && !dir.join(CONFIG_FILE).exists() {
            return Err(ModelError::MissingDir(dir.into()));
        }
        let model = load_any(dir, device)?;
        let tk_dir = match &model.peft {
            Some(info) if adapter && !dir.join(TOKENIZER_FILE).exists() => info.base.clone(),
            _ => dir.to_path_buf(),
        };
        let tokenizer = Tokenizer::load(&tk_dir.join(TOKENIZER_FILE))?;
        check_vocab(&tokenizer, &model)?;
        Ok(ModelDir {
            path: dir.into(),
            model,
            tokenizer,
        })
    }

    /// Writes the model and the tokenizer files into `dir`: a plain model directory, or an
    /// adapter directory when the model carries PEFT modules.
    pub fn save(model: &Llama, tokenizer: &Tokenizer, dir: &Path) -> Result<(), ModelError> {
        check_vocab(tokenizer, model)?;
        if model.has_peft_modules() {
            save_adapter(model, dir)?;
        } else {
            save_llama(model, dir)?;
        }
        tokenizer.save(dir, Some(model.config.max_position_embeddings))?;
        Ok(())
    }
}

pub fn check_vocab(tokenizer: &Tokenizer, model: &Llama) -> Result<(), ModelError> {
    if tokenizer.vocab_size() > model.config.vocab_size {
        return Err(ModelError::VocabMismatch {
            tokenizer: tokenizer.vocab_size(),
            model: model.config.vocab_size,
        });
    }
    Ok(())
}
