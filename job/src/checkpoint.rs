//! `[checkpoint]`: where and how often the job's durable state is written, and how much is kept.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::JobConfigError;

/// `[checkpoint]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Directory holding `step-<N>/` checkpoints; on a cluster a path every node shares. Empty
    /// means `runs/<job.name>/checkpoints`.
    pub dir: String,
    /// Write a checkpoint every this many optimizer steps; 0 writes one only at the end.
    pub every_steps: u64,
    /// Complete checkpoints kept (the newest ones); older ones are pruned. At least 1.
    pub keep_last: u32,
    /// Also keep the checkpoint with the best value of this evaluation metric, e.g.
    /// `detection.AP50` (higher is better; a metric where lower is better is not accepted).
    /// Empty keeps no extra one.
    pub keep_best: String,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { dir: String::new(), every_steps: 0, keep_last: 3, keep_best: String::new() }
    }
}

/// Metric prefixes `keep_best` may name: the merged evaluation's keys start with one of these.
const BEST_PREFIXES: [&str; 3] = ["classification.", "detection.", "segmentation."];

impl CheckpointSection {
    /// The checkpoint directory with its default resolved.
    pub fn dir_path(&self, job_name: &str) -> PathBuf {
        if self.dir.is_empty() {
            Path::new("runs").join(job_name).join("checkpoints")
        } else {
            PathBuf::from(&self.dir)
        }
    }

    /// Checks ranges and the `keep_best` metric's form.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        let invalid = |key: &str, message: String| JobConfigError::Invalid { key: key.into(), message };
        if self.keep_last == 0 {
            return Err(invalid("checkpoint.keep_last", "must be at least 1, got 0".into()));
        }
        let best = self.keep_best.as_str();
        if !best.is_empty() && !BEST_PREFIXES.iter().any(|p| best.len() > p.len() && best.starts_with(p)) {
            return Err(invalid(
                "checkpoint.keep_best",
                format!("`{best}` is not an evaluation metric like `detection.AP50` or `segmentation.mIoU`"),
            ));
        }
        Ok(())
    }
}
