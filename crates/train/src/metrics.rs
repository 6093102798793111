//! `metrics.jsonl`: one JSON object per line for every logged step and evaluation, so any tool
//! can plot or compare runs. Appending survives resume: records past the resumed step are
//! dropped first, so the file matches an uninterrupted run.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{io_err, TrainError};

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`, dropping records with a step after `resume_step`.
    pub fn open(dir: &Path, resume_step: Option<usize>) -> Result<Self, TrainError> {
        let path = dir.join("metrics.jsonl");
        match resume_step {
            Some(step) if path.exists() => {
                let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|s| s as usize <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&path, kept).map_err(io_err(&path))?;
            }
            _ => {
                std::fs::write(&path, "").map_err(io_err(&path))?;
            }
        }
        Ok(MetricsLog { path })
    }

    pub fn write(&self, record: &serde_json::Value) -> Result<(), TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        writeln!(f, "{record}").map_err(io_err(&self.path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All records of the file.
    pub fn read(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
