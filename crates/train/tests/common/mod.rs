//! A pre-training run on the built-in world with the `test` preset, shared by the test binaries
//! that train.

use std::path::{Path, PathBuf};

use kiln_model::{default_device, Llama};
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
    Llama::init(
        &s.config.llama_config(&s.tokenizer),
        s.config.seed,
        &default_device().autodiff(),
    )
    .unwrap()
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
