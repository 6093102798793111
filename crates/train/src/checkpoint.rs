//! Checkpoints: `checkpoints/step-NNNNNNN/` holding the HF model directory, `optimizer.safetensors`
//! (AdamW moments by parameter path), `trainer_state.json` (step, tokens, best validation loss,
//! elapsed time) and the resolved `run_config.toml`.
//!
//! Each is written into a hidden temporary directory, every file fsynced, then renamed into
//! place, so a crash mid-write leaves the previous checkpoint untouched and the half-written one
//! invisible (it is swept away at the next start).

use std::path::{Path, PathBuf};

use kiln_model::burn::tensor::Device;
use kiln_model::checkpoint::{safetensors_bytes, write_atomic, TensorFile};
use serde::{Deserialize, Serialize};

use crate::optim::AdamW;
use crate::trainer::TrainModel;
use crate::{io_err, TrainConfig, TrainError};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const RUN_CONFIG_FILE: &str = "run_config.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub tokens: u64,
    pub best_val: Option<f64>,
    pub elapsed_s: f64,
    pub optimizer_t: u64,
    /// The stage's own resumable state.
    #[serde(default)]
    pub stage: serde_json::Value,
}

fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:07}"))
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes a checkpoint of `step` under `root`; returns its directory.
pub fn save<M: TrainModel>(
    root: &Path,
    model: &M,
    tokenizer: &kiln_tokenizer::Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<PathBuf, TrainError> {
    let final_dir = step_dir(root, state.step);
    let tmp = root.join(format!(".step-{:07}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    model.save_dir(tokenizer, &tmp)?;
    write_atomic(
        &tmp.join(OPTIMIZER_FILE),
        &safetensors_bytes(&opt.tensors()),
    )?;
    write_atomic(&tmp.join(RUN_CONFIG_FILE), config.to_toml().as_bytes())?;
    // The state file goes last: its presence marks a complete checkpoint.
    write_atomic(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(state)
            .expect("json")
            .as_bytes(),
    )?;
    fsync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
    fsync_dir(root);
    Ok(final_dir)
}

/// Replaces `root/best` with a copy of checkpoint `dir`, atomically.
pub fn mark_best(root: &Path, dir: &Path) -> Result<(), TrainError> {
    let tmp = root.join(".best.tmp");
    let best = root.join("best");
    let old = root.join(".best.old");
    for d in [&tmp, &old] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(io_err(d))?;
        }
    }
    copy_dir(dir, &tmp)?;
    fsync_dir(&tmp);
    if best.exists() {
        std::fs::rename(&best, &old).map_err(io_err(&best))?;
    }
    std::fs::rename(&tmp, &best).map_err(io_err(&best))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    fsync_dir(root);
    Ok(())
}

fn copy_dir(src: &Path, dst: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;
    for entry in std::fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let to = dst.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to).map_err(io_err(&to))?;
        }
    }
    Ok(())
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            e.path().join(STATE_FILE).exists().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete checkpoint.
pub fn latest(root: &Path) -> Option<PathBuf> {
    list(root).pop().map(|(_, p)| p)
}

/// Deletes all but the newest `keep` checkpoints and any half-written temporary ones.
pub fn prune(root: &Path, keep: usize) -> Result<(), TrainError> {
    let all = list(root);
    let n = all.len();
    for (_, dir) in all.into_iter().take(n.saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    sweep_temporaries(root)
}

pub fn sweep_temporaries(root: &Path) -> Result<(), TrainError> {
    for e in std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_dir_all(e.path()).map_err(io_err(&e.path()))?;
        }
    }
    Ok(())
}

/// Loads model, optimizer and trainer state from checkpoint `dir`.
pub fn load<M: TrainModel>(
    dir: &Path,
    opt: &mut AdamW,
    device: &Device,
) -> Result<(M, TrainerState), TrainError> {
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(io_err(&spath))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Other(format!("{}: {e}", spath.display())))?;
    let model = M::load_dir(dir, device)?;
    let file = TensorFile::read(&dir.join(OPTIMIZER_FILE))?;
    opt.load_tensors(file.tensors, state.optimizer_t, device);
    Ok((model, state))
}
