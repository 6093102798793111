//! Kiln's training: the one loop every stage runs on (optimizer, schedule, clipping,
//! accumulation, evaluation, checkpoint/resume, metrics, progress), and the stages themselves.
//! Each stage supplies its batches, its loss and its evaluation; the trainer does the rest.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod perf;
pub mod plot;
pub mod schedule;
pub mod stages;
pub mod trainer;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

pub use config::TrainConfig;
pub use trainer::{Stage, TrainOutcome, Trainer};

/// Set by the binary's Ctrl-C handler: the trainer saves a checkpoint and stops cleanly.
pub static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error(transparent)]
    Tokenizer(#[from] kiln_tokenizer::TokenizerError),
    #[error(transparent)]
    Engine(#[from] kiln_engine::EngineError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("training diverged at step {step}: {what}; the last good checkpoint is kept in {checkpoints} (lower optim.lr or raise optim.grad_clip, then --resume)")]
    Diverged {
        step: usize,
        what: String,
        checkpoints: PathBuf,
    },
    #[error("nothing to resume in {0}: no complete checkpoint there")]
    NothingToResume(PathBuf),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.into(),
        source: e,
    }
}
