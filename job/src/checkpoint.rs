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

/// The metrics `keep_best` may name, per task: `task.key`, where `key` is the name the merged
/// evaluation reports it under (every one higher-is-better).
const BEST_METRICS: [(&str, &[&str]); 3] = [
    ("classification", &["accuracy", "precision", "recall", "F1", "mAP"]),
    ("detection", &["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]),
    ("segmentation", &["mIoU", "pixel_accuracy"]),
];

impl CheckpointSection {
    /// The checkpoint directory with its default resolved.
    pub fn dir_path(&self, job_name: &str) -> PathBuf {
        if self.dir.is_empty() {
            Path::new("runs").join(job_name).join("checkpoints")
        } else {
            PathBuf::from(&self.dir)
        }
    }

    /// The key `keep_best` names in the merged evaluation's metrics (`detection.AP50` is
    /// reported as `AP50`), or `None` when no best checkpoint is kept.
    pub fn keep_best_key(&self) -> Option<&str> {
        self.keep_best.split_once('.').map(|(_, key)| key)
    }

    /// Checks ranges and the `keep_best` metric's name.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        let invalid = |key: &str, message: String| JobConfigError::Invalid { key: key.into(), message };
        if self.keep_last == 0 {
            return Err(invalid("checkpoint.keep_last", "must be at least 1, got 0".into()));
        }
        let best = self.keep_best.as_str();
        let known = |(task, key): (&str, &str)| {
            BEST_METRICS.iter().any(|(t, keys)| *t == task && keys.contains(&key))
        };
        if !best.is_empty() && !best.split_once('.').is_some_and(known) {
            let names: Vec<String> = BEST_METRICS
                .iter()
                .flat_map(|(task, keys)| keys.iter().map(move |k| format!("{task}.{k}")))
                .collect();
            return Err(invalid(
                "checkpoint.keep_best",
                format!("`{best}` is not an evaluation metric; one of: {}", names.join(", ")),
            ));
        }
        Ok(())
    }
}
