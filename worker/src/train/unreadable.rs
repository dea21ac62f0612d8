//! The limit on unreadable training images (`data.max_unreadable_fraction`): the loader skips
//! an image it cannot read, but a run whose data is mostly missing must stop, not train on
//! empty batches to the end.
//!
//! Counted per epoch over all ranks: every step's global image count rides in the step's first
//! all-reduce (`Counts::samples`), so the images skipped by all ranks together are the global
//! batch less that count. Every rank sees the same numbers and decides at the same step, so
//! all of them fail together with the same error. The decision is taken as soon as the
//! skipped images exceed the limit's share of the images the run trains in the epoch: the
//! count only grows, so stopping early gives the verdict the epoch's end would give.
use std::path::PathBuf;

use crate::WorkerError;

/// Example paths named in the error.
const EXAMPLES: usize = 3;

/// One epoch's unreadable images against the limit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unreadable {
    limit: f64,
    epoch: u64,
    /// Images this run trains in the epoch, over all ranks.
    planned: u64,
    /// Images skipped so far in the epoch, over all ranks.
    skipped: u64,
}

impl Unreadable {
    /// Starts counting `epoch`, of which this run trains `planned` images over all ranks.
    pub(crate) fn new(limit: f64, epoch: u64, planned: u64) -> Self {
        Self { limit, epoch, planned, skipped: 0 }
    }

    /// Images skipped so far in the epoch, over all ranks.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Counts a step that should have trained `attempted` images (over all ranks) and trained
    /// `trained`. Fails once the epoch's skipped images exceed the limit; `examples` are this
    /// rank's skipped samples (id, path, reason), the first few of which the error names.
    pub(crate) fn count(
        &mut self,
        attempted: u64,
        trained: u64,
        examples: &[(u64, PathBuf, String)],
    ) -> Result<(), WorkerError> {
        self.skipped += attempted.saturating_sub(trained);
        if (self.skipped as f64) <= self.limit * self.planned as f64 {
            return Ok(());
        }
        let named: Vec<String> = examples
            .iter()
            .take(EXAMPLES)
            .map(|(_, path, reason)| format!("{} ({reason})", path.display()))
            .collect();
        let named = if named.is_empty() { "none on this rank".to_string() } else { named.join("; ") };
        Err(WorkerError::Data {
            key: "data.max_unreadable_fraction".into(),
            message: format!(
                "epoch {}: {} of its {} training images (all ranks) cannot be read, {:.2}% > the limit {:.2}%; \
                 e.g. {named}",
                self.epoch,
                self.skipped,
                self.planned,
                100.0 * self.skipped as f64 / self.planned.max(1) as f64,
                100.0 * self.limit
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> (u64, PathBuf, String) {
        (1, PathBuf::from(name), "cannot read image: not a PNG".into())
    }

    #[test]
    fn a_few_skipped_images_pass_and_more_than_the_limit_fail_naming_the_epoch_and_paths() {
        // 1% of 400 images: 4 may be skipped, the 5th fails.
        let mut count = Unreadable::new(0.01, 3, 400);
        for _ in 0..4 {
            count.count(8, 7, &[]).unwrap();
        }
        assert_eq!(count.skipped(), 4);
        count.count(8, 8, &[]).unwrap();
        let examples: Vec<_> = ["a.png", "b.png", "c.png", "d.png"].map(example).into();
        let err = count.count(8, 7, &examples).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, WorkerError::Data { ref key, .. } if key == "data.max_unreadable_fraction"));
        for part in
            ["epoch 3", "5 of its 400", "1.25% > the limit 1.00%", "a.png (cannot read image", "c.png"]
        {
            assert!(message.contains(part), "`{part}` missing from: {message}");
        }
        assert!(!message.contains("d.png"), "a few examples, not all: {message}");
    }

    #[test]
    fn the_bounds_of_the_limit() {
        // 0 tolerates nothing, 1 everything (a step of zero images included).
        assert!(Unreadable::new(0.0, 0, 100)
            .count(4, 3, &[])
            .unwrap_err()
            .to_string()
            .contains("none on this rank"));
        Unreadable::new(0.0, 0, 100).count(4, 4, &[]).unwrap();
        let mut all = Unreadable::new(1.0, 0, 8);
        all.count(4, 0, &[]).unwrap();
        all.count(4, 0, &[]).unwrap();
        assert_eq!(all.skipped(), 8);
    }
}
