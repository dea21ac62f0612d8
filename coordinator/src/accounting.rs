//! Per-epoch sample accounting: which positions of each epoch's permutation were trained, by
//! which generation, and which of them a rollback discarded.
//!
//! A train epoch is a permutation of the split (`mtl_job::sharding`), consumed from the front in
//! global batches. A generation that trains part of it owns a *segment* `[start, end)` of
//! permutation positions: it starts where the state it holds had stopped and grows by one global
//! batch per step of rank 0. A segment that starts below where an earlier one ended rolls the
//! earlier one back to that point (`kept_end`). The kept parts of an epoch's segments then tile
//! `[0, last end)` with no gap and no overlap: every sample exactly once.
use mtl_proto::v1::EpochSegment;

/// One generation's run through one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) epoch: u64,
    pub(crate) generation: u64,
    pub(crate) world_size: u32,
    pub(crate) batch_size: u32,
    /// Samples in the split.
    pub(crate) samples: u64,
    /// First permutation position trained.
    pub(crate) start: u64,
    /// Rank 0's completed steps when the segment began.
    pub(crate) steps_at_start: u64,
    /// One past the last position trained so far.
    pub(crate) end: u64,
    /// One past the last position whose training was kept (not rolled back).
    pub(crate) kept_end: u64,
    /// Where the segment ends once all its steps ran (the tail shorter than a global batch
    /// is not trained).
    pub(crate) planned_end: u64,
}

impl Segment {
    fn global_batch(&self) -> u64 {
        u64::from(self.world_size) * u64::from(self.batch_size)
    }

    pub(crate) fn to_proto(&self) -> EpochSegment {
        EpochSegment {
            epoch: self.epoch,
            generation: self.generation,
            world_size: self.world_size,
            batch_size: self.batch_size,
            start: self.start,
            end: self.end,
            kept_end: self.kept_end,
            samples: self.samples,
        }
    }
}

/// What a generation's first shard request of an epoch fixes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentStart {
    pub(crate) epoch: u64,
    pub(crate) generation: u64,
    pub(crate) world_size: u32,
    pub(crate) batch_size: u32,
    pub(crate) samples: u64,
    pub(crate) start: u64,
    pub(crate) steps_at_start: u64,
    /// Steps every rank runs in this segment.
    pub(crate) steps: u64,
}

/// Every segment of the job, in the order they began.
#[derive(Debug, Default)]
pub(crate) struct Accounting {
    segments: Vec<Segment>,
}

impl Accounting {
    pub(crate) fn new(segments: Vec<Segment>) -> Self {
        Self { segments }
    }

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The segment of `generation` in `epoch`, if it began.
    pub(crate) fn find(&self, generation: u64, epoch: u64) -> Option<&Segment> {
        self.segments.iter().find(|s| s.generation == generation && s.epoch == epoch)
    }

    /// The latest epoch's segment of `generation`.
    pub(crate) fn current(&self, generation: u64) -> Option<&Segment> {
        self.segments.iter().filter(|s| s.generation == generation).max_by_key(|s| s.epoch)
    }

    /// Begins a segment. Earlier epochs of the same generation are complete (its ranks moved
    /// on); other generations' segments at or past `start` in this epoch, and in later epochs,
    /// are rolled back. Returns every segment that changed, the new one last.
    pub(crate) fn begin(&mut self, s: SegmentStart) -> Vec<Segment> {
        let mut changed = Vec::new();
        for seg in &mut self.segments {
            let before = seg.clone();
            if seg.generation == s.generation && seg.epoch < s.epoch {
                seg.end = seg.planned_end;
                seg.kept_end = seg.kept_end.max(seg.end);
            } else if seg.generation != s.generation && seg.epoch == s.epoch {
                seg.kept_end = seg.kept_end.min(s.start.max(seg.start));
            } else if seg.generation != s.generation && seg.epoch > s.epoch {
                seg.kept_end = seg.start;
            }
            if *seg != before {
                changed.push(seg.clone());
            }
        }
        let global = u64::from(s.world_size) * u64::from(s.batch_size);
        let segment = Segment {
            epoch: s.epoch,
            generation: s.generation,
            world_size: s.world_size,
            batch_size: s.batch_size,
            samples: s.samples,
            start: s.start,
            steps_at_start: s.steps_at_start,
            end: s.start,
            kept_end: s.start,
            planned_end: s.start + s.steps * global,
        };
        self.segments.push(segment.clone());
        changed.push(segment);
        changed
    }

    /// Rank 0 of `generation` has completed `steps` steps in the job: its current segment
    /// grows to match. Returns the segment when it changed.
    pub(crate) fn advance(&mut self, generation: u64, steps: u64) -> Option<Segment> {
        let seg = self.segments.iter_mut().filter(|s| s.generation == generation).max_by_key(|s| s.epoch)?;
        let done = steps.saturating_sub(seg.steps_at_start);
        let end = (seg.start + done * seg.global_batch()).min(seg.planned_end);
        if end <= seg.end {
            return None;
        }
        seg.end = end;
        seg.kept_end = end;
        Some(seg.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtl_job::sharding::{permutation, train_shard, ShardSpec};
    use std::collections::BTreeSet;

    fn start(epoch: u64, generation: u64, world_size: u32, start: u64, steps_at_start: u64) -> SegmentStart {
        let (samples, batch_size) = (100, 5);
        let global = u64::from(world_size) * u64::from(batch_size);
        SegmentStart {
            epoch,
            generation,
            world_size,
            batch_size,
            samples,
            start,
            steps_at_start,
            steps: (samples - start) / global,
        }
    }

    #[test]
    fn kept_segments_tile_the_epoch_across_a_rollback_and_a_new_world_size() {
        let mut a = Accounting::default();
        // Generation 1: 3 ranks x batch 5, 4 steps (60 samples) of epoch 0, then lost.
        a.begin(start(0, 1, 3, 0, 0));
        a.advance(1, 4).unwrap();
        assert_eq!(a.current(1).unwrap().end, 60);
        // Generation 2 resumes from a checkpoint at 45 samples with 2 ranks.
        let changed = a.begin(start(0, 2, 2, 45, 3));
        assert_eq!(changed.len(), 2);
        assert_eq!((changed[0].end, changed[0].kept_end), (60, 45), "15 samples rolled back");
        assert!(a.advance(2, 3).is_none(), "no step yet");
        a.advance(2, 3 + 5).unwrap();
        let seg = a.current(2).unwrap().clone();
        assert_eq!((seg.start, seg.end, seg.planned_end), (45, 95, 95));
        assert!(a.advance(2, 100).is_none(), "capped at the planned end");

        // The kept parts, mapped through the permutation and the shards, cover every sample
        // of [0, 95) exactly once.
        let perm = permutation(100, 7, 0);
        let mut seen = Vec::new();
        for s in a.segments() {
            seen.extend_from_slice(&perm[s.start as usize..s.kept_end as usize]);
        }
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        assert_eq!((seen.len(), unique.len()), (95, 95));
        // And they are what the ranks of generation 2 are handed.
        let trained: BTreeSet<u64> = (0..2)
            .flat_map(|rank| {
                train_shard(ShardSpec {
                    samples: 100,
                    seed: 7,
                    epoch: 0,
                    consumed: 45,
                    world_size: 2,
                    rank,
                    batch_size: 5,
                })
                .positions
            })
            .collect();
        assert_eq!(trained, perm[45..95].iter().copied().collect());
    }

    #[test]
    fn a_new_epoch_closes_the_previous_one_and_a_resume_discards_later_epochs() {
        let mut a = Accounting::default();
        a.begin(start(0, 1, 2, 0, 0));
        a.advance(1, 2);
        let changed = a.begin(start(1, 1, 2, 0, 10));
        assert_eq!(changed[0].end, 100, "epoch 0 ran its 10 steps");
        a.advance(1, 12);
        // Generation 2 resumes in epoch 0 (an older checkpoint): epoch 1's work is discarded.
        let changed = a.begin(start(0, 2, 2, 50, 5));
        let epoch1 = changed.iter().find(|s| s.epoch == 1).unwrap();
        assert_eq!((epoch1.end, epoch1.kept_end), (20, 0));
        assert_eq!(a.find(1, 0).unwrap().kept_end, 50);
    }
}
