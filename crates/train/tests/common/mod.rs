//! A pre-training run on the built-in world with the `test` preset, shared by the test binaries
//! that train.

use std::path::{Path, PathBuf};

use kiln_model::{default_device, Llama, LlamaConfig};
use kiln_tokenizer::Tokenizer;
use kiln_train::stages::pretrain::{prepare_shard, Pretrain};
use kiln_train::{TrainConfig, Trainer};

pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub tokenizer: Tokenizer,
    pub config: TrainConfig,
}

pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    kiln_data::world::synth(&root.join("world"), 5, 0.05).unwrap();
    let corpus = root.join("world/corpus.txt");
    let tokenizer = Tokenizer::train(&[corpus], 512).unwrap();
    let mut config = TrainConfig::load("test").unwrap();
    config.log.progress = false;
    Setup {
        _dir: dir,
        root,
        tokenizer,
        config,
    }
}

pub fn model_for(s: &Setup) -> Llama {
    let m = &s.config.model;
    let mut c = LlamaConfig::new(
        s.tokenizer.vocab_size(),
        m.hidden_size,
        m.intermediate_size,
        m.num_hidden_layers,
        m.num_attention_heads,
        m.num_key_value_heads,
        m.max_position_embeddings,
    );
    c.tie_word_embeddings = m.tie_word_embeddings;
    Llama::init(&c, s.config.seed, &default_device().autodiff()).unwrap()
}

pub fn trainer(s: &Setup, out: &Path, resume: bool, stop_after: Option<usize>) -> Trainer {
    Trainer {
        name: "pretrain".into(),
        config: s.config.clone(),
        out: out.into(),
        tokenizer: s.tokenizer.clone(),
        resume,
        stop_after,
        peak_gflops: Some(100.0),
    }
}

pub fn stage(s: &Setup) -> Pretrain {
    let shard = prepare_shard(
        &[s.root.join("world/corpus.txt")],
        &s.tokenizer,
        &s.root.join("shard"),
        Default::default(),
    )
    .unwrap();
    Pretrain::new(shard, &s.tokenizer, &s.config, &default_device().autodiff()).unwrap()
}
