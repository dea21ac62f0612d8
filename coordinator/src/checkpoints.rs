//! The checkpoint registry's rules: where a committed checkpoint may live and which ones
//! pruning deletes. Pure functions, except that the path check reads the file system.
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use mtl_proto::v1::{CheckpointInfo, ResumeFrom};

/// A committed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Checkpoint {
    pub(crate) step: u64,
    pub(crate) epoch: u64,
    pub(crate) epoch_position: u64,
    pub(crate) generation: u64,
    /// As the committing worker reported it.
    pub(crate) path: String,
    /// Where it is on the coordinator's file system (what pruning deletes).
    pub(crate) resolved: PathBuf,
    /// Evaluation metrics at its step and the training scalars last reported before it.
    pub(crate) metrics: BTreeMap<String, f64>,
    pub(crate) pruned: bool,
}

impl Checkpoint {
    pub(crate) fn resume(&self) -> ResumeFrom {
        ResumeFrom {
            path: self.path.clone(),
            step: self.step,
            epoch: self.epoch,
            epoch_position: self.epoch_position,
            generation: self.generation,
        }
    }

    pub(crate) fn to_proto(&self) -> CheckpointInfo {
        CheckpointInfo {
            step: self.step,
            epoch: self.epoch,
            epoch_position: self.epoch_position,
            generation: self.generation,
            path: self.path.clone(),
            metrics: self.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            pruned: self.pruned,
        }
    }
}

/// Resolves a reported checkpoint path: absolute, or relative to the checkpoint directory
/// `dir`. It must name an existing directory strictly inside `dir` once symbolic links are
/// followed; `..` components are refused outright. The error says what is wrong.
pub(crate) fn resolve(dir: &Path, reported: &str) -> Result<PathBuf, String> {
    if reported.is_empty() {
        return Err("is empty".into());
    }
    let given = Path::new(reported);
    if given.components().any(|c| c == Component::ParentDir) {
        return Err(format!("`{reported}` contains `..`"));
    }
    let joined = if given.is_absolute() { given.to_owned() } else { dir.join(given) };
    let root = dir
        .canonicalize()
        .map_err(|e| format!("the checkpoint directory {} cannot be read: {e}", dir.display()))?;
    let resolved = joined.canonicalize().map_err(|e| format!("{}: {e}", joined.display()))?;
    if !resolved.starts_with(&root) || resolved == root {
        return Err(format!(
            "`{reported}` ({}) is not inside the checkpoint directory {}",
            resolved.display(),
            root.display()
        ));
    }
    if !resolved.is_dir() {
        return Err(format!("{} is not a directory", resolved.display()));
    }
    Ok(resolved)
}

/// Which committed checkpoints to delete: all but the newest `keep_last`, except the best by
/// `best_metric` (higher is better; only checkpoints with that metric compete; among equals the
/// newest) and the `protected` one (the checkpoint a resume is using). Already pruned ones are
/// not returned. Steps ascending.
pub(crate) fn to_prune(
    checkpoints: &[Checkpoint],
    keep_last: u32,
    best_metric: Option<&str>,
    protected: Option<u64>,
) -> Vec<u64> {
    let mut live: Vec<&Checkpoint> = checkpoints.iter().filter(|c| !c.pruned).collect();
    live.sort_by_key(|c| c.step);
    let best = best_metric.and_then(|key| best(checkpoints, key));
    let keep_from = live.len().saturating_sub(keep_last as usize);
    live[..keep_from]
        .iter()
        .map(|c| c.step)
        .filter(|&step| Some(step) != best && Some(step) != protected)
        .collect()
}

/// The step of the best checkpoint by `metric` (higher is better; among equals the newest).
pub(crate) fn best(checkpoints: &[Checkpoint], metric: &str) -> Option<u64> {
    checkpoints
        .iter()
        .filter(|c| !c.pruned)
        .filter_map(|c| c.metrics.get(metric).filter(|v| v.is_finite()).map(|v| (*v, c.step)))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
        .map(|(_, step)| step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(step: u64, ap: Option<f64>) -> Checkpoint {
        Checkpoint {
            step,
            epoch: 0,
            epoch_position: 0,
            generation: 1,
            path: format!("step-{step}"),
            resolved: PathBuf::from(format!("/c/step-{step}")),
            metrics: ap.map(|v| ("detection.AP50".to_string(), v)).into_iter().collect(),
            pruned: false,
        }
    }

    #[test]
    fn pruning_keeps_the_newest_the_best_and_the_protected_one() {
        let all: Vec<Checkpoint> =
            [(10, Some(0.3)), (20, Some(0.9)), (30, None), (40, Some(0.5)), (50, None)]
                .into_iter()
                .map(|(s, ap)| ckpt(s, ap))
                .collect();
        assert_eq!(to_prune(&all, 2, None, None), [10, 20, 30]);
        assert_eq!(to_prune(&all, 2, Some("detection.AP50"), None), [10, 30], "20 is the best");
        assert_eq!(to_prune(&all, 2, Some("detection.AP50"), Some(10)), [30], "10 is in use");
        assert_eq!(to_prune(&all, 5, None, None), Vec::<u64>::new());
        assert_eq!(to_prune(&all, 9, None, None), Vec::<u64>::new());
        // A metric no checkpoint has protects nothing; pruned ones are not pruned twice.
        let mut some_pruned = all.clone();
        some_pruned[0].pruned = true;
        assert_eq!(to_prune(&some_pruned, 1, Some("segmentation.mIoU"), None), [20, 30, 40]);
    }

    #[test]
    fn the_best_is_the_highest_finite_value_and_the_newest_among_equals() {
        let all = vec![ckpt(1, Some(0.5)), ckpt(2, Some(f64::NAN)), ckpt(3, Some(0.5)), ckpt(4, Some(0.1))];
        assert_eq!(best(&all, "detection.AP50"), Some(3));
        assert_eq!(best(&all, "classification.accuracy"), None);
    }

    #[test]
    fn paths_must_resolve_inside_the_checkpoint_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        std::fs::create_dir_all(dir.join("step-5")).unwrap();
        std::fs::create_dir_all(root.path().join("elsewhere")).unwrap();
        std::fs::write(dir.join("file"), b"x").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.path().join("elsewhere"), dir.join("link")).unwrap();

        let inside = dir.canonicalize().unwrap().join("step-5");
        assert_eq!(resolve(&dir, "step-5").unwrap(), inside);
        assert_eq!(resolve(&dir, &dir.join("step-5").display().to_string()).unwrap(), inside);
        assert_eq!(resolve(&dir, "./step-5/").unwrap(), inside);

        let err = |reported: &str| resolve(&dir, reported).unwrap_err();
        assert!(err("../elsewhere").contains("contains `..`"));
        assert!(err("step-5/../../elsewhere").contains("contains `..`"));
        let elsewhere = root.path().join("elsewhere").display().to_string();
        assert!(err(&elsewhere).contains("not inside the checkpoint directory"), "{}", err(&elsewhere));
        assert!(err("link").contains("not inside the checkpoint directory"), "a symlink out is refused");
        assert!(err(".").contains("not inside"), "the directory itself is not a checkpoint");
        assert!(err("file").contains("not a directory"));
        assert!(err("step-6").contains("step-6"), "a missing one is named");
        assert!(err("").contains("empty"));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_anywhere_in_the_path_and_look_alike_prefixes_cannot_escape() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        std::fs::create_dir_all(dir.join("step-5")).unwrap();
        std::fs::create_dir_all(root.path().join("elsewhere/step-9")).unwrap();
        std::fs::create_dir_all(root.path().join("ckpt-evil/step-1")).unwrap();
        symlink(root.path().join("elsewhere"), dir.join("out")).unwrap();
        symlink(dir.join("step-5"), dir.join("latest")).unwrap();
        symlink(root.path(), dir.join("up")).unwrap();
        let err = |reported: &str| resolve(&dir, reported).unwrap_err();

        // A link in the middle of the path, an absolute path through one, a link to an ancestor.
        assert!(err("out/step-9").contains("not inside"), "{}", err("out/step-9"));
        let through = dir.join("out/step-9").display().to_string();
        assert!(err(&through).contains("not inside"), "{}", err(&through));
        assert!(err("up/elsewhere").contains("not inside"));
        // A sibling whose name starts with the directory's is not inside it.
        let sibling = root.path().join("ckpt-evil/step-1").display().to_string();
        assert!(err(&sibling).contains("not inside"), "{}", err(&sibling));
        // Absolute paths that are not below the directory, and odd bytes.
        assert!(err("/").contains("not inside"));
        assert!(err("/etc").contains("not inside"));
        assert!(resolve(&dir, "step-5\0x").is_err(), "a NUL byte");
        assert!(err("step-5/..").contains("contains `..`"));

        // A link that stays inside resolves to its target; a checkpoint directory that is itself
        // reached through a link works.
        let inside = dir.canonicalize().unwrap().join("step-5");
        assert_eq!(resolve(&dir, "latest").unwrap(), inside);
        assert_eq!(resolve(&dir, "up/ckpt/step-5").unwrap(), inside, "out and back in is inside");
        symlink(&dir, root.path().join("alias")).unwrap();
        assert_eq!(resolve(&root.path().join("alias"), "step-5").unwrap(), inside);
        assert!(resolve(&root.path().join("alias"), "out/step-9").unwrap_err().contains("not inside"));
    }
}
