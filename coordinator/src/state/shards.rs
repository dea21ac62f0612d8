//! Train and validation shards, and the epoch accounting they begin.
use std::time::Instant;

use mtl_job::sharding;
use mtl_proto::v1::{ShardRequest, ShardResponse, Split};

use super::JobState;
use crate::accounting::SegmentStart;
use crate::CoordinatorError;

impl JobState {
    /// This rank's samples for one epoch of one split; checks every rank sees the same data
    /// and, for training, records which part of the epoch this generation trains. The first
    /// train request of an epoch in a generation is an admission point: once it is answered,
    /// workers waiting to join end the generation (see `admission`).
    pub(crate) fn shard(
        &mut self,
        req: &ShardRequest,
        now: Instant,
    ) -> Result<ShardResponse, CoordinatorError> {
        let split = Split::try_from(req.split).unwrap_or(Split::Unspecified);
        if split == Split::Unspecified {
            return Err(CoordinatorError::InvalidRequest {
                field: "split",
                message: format!("unknown split {}", req.split),
            });
        }
        let rank = self.rank_in(&req.worker_id, req.generation)? as u32;
        let world_size = self.generation.as_ref().map_or(0, |g| g.members.len() as u32);
        let seen = (req.dataset_samples, req.dataset_fingerprint.clone(), req.worker_id.clone());
        let first = self.datasets.entry(req.split).or_insert(seen);
        if (first.0, &first.1) != (req.dataset_samples, &req.dataset_fingerprint) {
            return Err(CoordinatorError::DatasetMismatch {
                split: split.as_str_name(),
                worker_id: req.worker_id.clone(),
                first_worker: first.2.clone(),
                detail: format!(
                    "{} samples (index {}) vs {} samples (index {})",
                    req.dataset_samples, req.dataset_fingerprint, first.0, first.1
                ),
            });
        }
        let n = req.dataset_samples;
        let batch_size = self.cfg.train.batch_size;
        if split == Split::Val {
            return Ok(ShardResponse {
                epoch: req.epoch,
                positions: sharding::val_shard(n, world_size, rank),
                batch_size,
                steps: 0,
                epoch_position: 0,
            });
        }
        let begins = self.accounting.find(req.generation, req.epoch).is_none();
        let consumed = self.segment_start(req, rank, world_size)?;
        let seed = self.cfg.job.seed;
        let key = (n, req.epoch);
        let perm = match &mut self.permutation {
            Some((k, perm)) if *k == key => perm,
            slot => &mut slot.insert((key, sharding::permutation(n, seed, req.epoch))).1,
        };
        let shard = sharding::train_shard_of(
            perm,
            sharding::ShardSpec {
                samples: n,
                seed,
                epoch: req.epoch,
                consumed,
                world_size,
                rank,
                batch_size,
            },
        );
        if begins {
            let when = if consumed == 0 {
                format!("at the start of epoch {} (step {})", req.epoch, req.steps_done)
            } else {
                format!(
                    "as generation {} began epoch {} at sample {consumed} (step {})",
                    req.generation, req.epoch, req.steps_done
                )
            };
            self.admit_waiting(&when, now)?;
        }
        Ok(ShardResponse {
            epoch: req.epoch,
            positions: shard.positions,
            batch_size,
            steps: shard.steps,
            epoch_position: consumed,
        })
    }

    /// Where this generation's run through `req.epoch` starts. The first request of the
    /// generation for the epoch fixes it (the worker's own position, else the resume
    /// checkpoint's for its epoch, else 0); every other rank must agree.
    fn segment_start(
        &mut self,
        req: &ShardRequest,
        rank: u32,
        world_size: u32,
    ) -> Result<u64, CoordinatorError> {
        let n = req.dataset_samples;
        if let Some(seg) = self.accounting.find(req.generation, req.epoch) {
            return match req.epoch_position {
                Some(p) if p != seg.start => Err(CoordinatorError::InvalidRequest {
                    field: "epoch_position",
                    message: format!(
                        "rank {rank} continues epoch {} at sample {p}, but generation {} started it at {}: \
                         the ranks hold different state",
                        req.epoch, req.generation, seg.start
                    ),
                }),
                _ => Ok(seg.start),
            };
        }
        let resume =
            self.generation.as_ref().and_then(|g| g.resume.as_ref()).filter(|c| c.epoch == req.epoch);
        let start = req.epoch_position.or(resume.map(|c| c.epoch_position)).unwrap_or(0);
        if start > n {
            return Err(CoordinatorError::InvalidRequest {
                field: "epoch_position",
                message: format!("{start} is past the split's {n} samples"),
            });
        }
        let batch_size = self.cfg.train.batch_size;
        let global = u64::from(world_size) * u64::from(batch_size);
        let changed = self.accounting.begin(SegmentStart {
            epoch: req.epoch,
            generation: req.generation,
            world_size,
            batch_size,
            samples: n,
            start,
            steps_at_start: req.steps_done,
            steps: (n - start) / global,
        });
        for segment in &changed {
            self.store.put_segment(segment)?;
        }
        Ok(start)
    }
}
