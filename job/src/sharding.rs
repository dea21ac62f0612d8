//! Which rank processes which samples, like a careful `DistributedSampler`.
//!
//! Train: a permutation of the split from (seed, epoch); the part not yet consumed is cut into
//! global batches of `world_size * batch_size` and rank r takes the r-th slice of each, so every
//! rank runs the same number of steps and N ranks with batch b see exactly the samples one rank
//! with batch N*b sees, batch by batch. The tail shorter than one global batch is not trained
//! this epoch (drop rule); the next epoch's permutation puts other samples there.
//! Validation: every sample exactly once, rank r takes positions r, r+N, ... (no drop, no padding),
//! because evaluation statistics are merged exactly, not averaged.

use crate::splitmix::SplitMix64;

/// A shard of the train split for one rank and epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainShard {
    /// Positions into the split's canonical order, in training order.
    pub positions: Vec<u64>,
    /// Optimizer steps every rank runs.
    pub steps: u64,
}

/// A deterministic permutation of `0..n` from (seed, epoch): Fisher-Yates driven by SplitMix64.
pub fn permutation(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(SplitMix64::GAMMA) ^ 0xD1B5_4A32_D192_ED03);
    let mut perm: Vec<u64> = (0..n).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    perm
}

/// Which train shard to compute: one rank's view of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// Samples in the split.
    pub samples: u64,
    /// `job.seed`.
    pub seed: u64,
    /// The epoch (0-based).
    pub epoch: u64,
    /// Samples of the epoch's permutation already trained (before a restart), skipped.
    pub consumed: u64,
    /// Ranks training together.
    pub world_size: u32,
    /// This rank.
    pub rank: u32,
    /// Samples per rank per step.
    pub batch_size: u32,
}

/// The train shard `spec` describes: rank `spec.rank`'s positions of epoch `spec.epoch`,
/// skipping the first `spec.consumed` samples of the epoch's permutation.
pub fn train_shard(spec: ShardSpec) -> TrainShard {
    train_shard_of(&permutation(spec.samples, spec.seed, spec.epoch), spec)
}

/// [`train_shard`] with the epoch's permutation computed by the caller, who can then compute
/// it once for every rank (the coordinator serves a thousand ranks from one).
///
/// # Panics
/// If `perm` is not `spec.samples` long.
pub fn train_shard_of(perm: &[u64], spec: ShardSpec) -> TrainShard {
    let ShardSpec { samples: n, consumed, world_size, rank, batch_size, .. } = spec;
    assert_eq!(perm.len() as u64, n, "the permutation must cover the split");
    let (world, b) = (u64::from(world_size), u64::from(batch_size));
    let global = world * b;
    let remaining = n.saturating_sub(consumed);
    let steps = remaining / global;
    let rest = &perm[consumed.min(n) as usize..];
    let mut positions = Vec::with_capacity((steps * b) as usize);
    for step in 0..steps {
        let start = (step * global + u64::from(rank) * b) as usize;
        positions.extend_from_slice(&rest[start..start + b as usize]);
    }
    TrainShard { positions, steps }
}

/// Rank `rank`'s share of the validation split: every sample once across ranks.
pub fn val_shard(n: u64, world_size: u32, rank: u32) -> Vec<u64> {
    (u64::from(rank)..n).step_by(world_size as usize).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn permutation_is_a_permutation_and_depends_on_seed_and_epoch() {
        let p = permutation(1000, 1, 0);
        assert_eq!(p.iter().copied().collect::<BTreeSet<_>>().len(), 1000);
        assert_eq!(p, permutation(1000, 1, 0));
        assert_ne!(p, permutation(1000, 1, 1));
        assert_ne!(p, permutation(1000, 2, 0));
        assert_ne!(p, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn permutations_are_pinned() {
        // Python, the stream as it has always been (mix as in splitmix.rs's tests):
        //   s = (seed ^ (epoch * G) & M ^ 0xD1B54A32D192ED03); p = list(range(n))
        //   for i in range(n - 1, 0, -1): s = (s + G) & M; j = (mix(s) * (i + 1)) >> 64; p[i], p[j] = p[j], p[i]
        assert_eq!(permutation(10, 1, 0), [6, 7, 5, 3, 0, 8, 1, 9, 4, 2]);
        assert_eq!(permutation(12, 7, 3), [5, 0, 4, 11, 10, 2, 8, 9, 3, 7, 6, 1]);
    }

    #[test]
    fn every_sample_trained_once_except_the_documented_tail() {
        for n in [0u64, 1, 7, 64, 100, 1001] {
            for world in 1..=4u32 {
                for batch in [1u32, 3, 8] {
                    let global = u64::from(world * batch);
                    let shards: Vec<TrainShard> = (0..world)
                        .map(|r| {
                            train_shard(ShardSpec {
                                samples: n,
                                seed: 5,
                                epoch: 2,
                                consumed: 0,
                                world_size: world,
                                rank: r,
                                batch_size: batch,
                            })
                        })
                        .collect();
                    let steps = shards[0].steps;
                    assert!(shards.iter().all(|s| s.steps == steps), "same steps on every rank");
                    assert!(shards.iter().all(|s| s.positions.len() as u64 == steps * u64::from(batch)));
                    let all: Vec<u64> = shards.iter().flat_map(|s| s.positions.iter().copied()).collect();
                    let unique: BTreeSet<u64> = all.iter().copied().collect();
                    assert_eq!(unique.len(), all.len(), "no sample twice (n={n} world={world} b={batch})");
                    assert_eq!(all.len() as u64, n / global * global, "only the short tail is dropped");
                    // The dropped samples are exactly the permutation's tail.
                    let perm = permutation(n, 5, 2);
                    let tail: BTreeSet<u64> = perm[all.len()..].iter().copied().collect();
                    assert!(tail.is_disjoint(&unique));
                }
            }
        }
    }

    #[test]
    fn n_ranks_see_the_global_batches_of_one_rank_with_n_times_the_batch() {
        let (n, b) = (100u64, 4u32);
        for world in [2u32, 3] {
            let single = train_shard(ShardSpec {
                samples: n,
                seed: 9,
                epoch: 1,
                consumed: 0,
                world_size: 1,
                rank: 0,
                batch_size: world * b,
            });
            let shards: Vec<TrainShard> = (0..world)
                .map(|r| {
                    train_shard(ShardSpec {
                        samples: n,
                        seed: 9,
                        epoch: 1,
                        consumed: 0,
                        world_size: world,
                        rank: r,
                        batch_size: b,
                    })
                })
                .collect();
            assert_eq!(single.steps, shards[0].steps);
            for step in 0..single.steps as usize {
                let global = &single.positions[step * (world * b) as usize..][..(world * b) as usize];
                let joined: Vec<u64> = shards
                    .iter()
                    .flat_map(|s| s.positions[step * b as usize..][..b as usize].iter().copied())
                    .collect();
                assert_eq!(global, &joined[..], "step {step}, world {world}");
            }
        }
    }

    #[test]
    fn resume_mid_epoch_with_another_world_size_trains_the_rest_once() {
        let (n, seed, epoch) = (200u64, 3, 4);
        // Two ranks with batch 5 ran 6 steps (60 samples), then the job resumes on three ranks.
        let before: BTreeSet<u64> = (0..2)
            .flat_map(|r| {
                train_shard(ShardSpec {
                    samples: n,
                    seed,
                    epoch,
                    consumed: 0,
                    world_size: 2,
                    rank: r,
                    batch_size: 5,
                })
                .positions[..30]
                    .to_vec()
            })
            .collect();
        let after: Vec<u64> = (0..3)
            .flat_map(|r| {
                train_shard(ShardSpec {
                    samples: n,
                    seed,
                    epoch,
                    consumed: 60,
                    world_size: 3,
                    rank: r,
                    batch_size: 5,
                })
                .positions
            })
            .collect();
        let after_set: BTreeSet<u64> = after.iter().copied().collect();
        assert_eq!(after_set.len(), after.len());
        assert!(before.is_disjoint(&after_set), "nothing trained twice across the restart");
        assert_eq!(before.len() + after.len(), 60 + 135, "140 left, 135 in whole global batches of 15");
    }

    #[test]
    fn validation_covers_every_sample_exactly_once() {
        for n in [0u64, 1, 2, 10, 101] {
            for world in 1..=4u32 {
                let mut all: Vec<u64> = (0..world).flat_map(|r| val_shard(n, world, r)).collect();
                all.sort();
                assert_eq!(all, (0..n).collect::<Vec<_>>());
            }
        }
    }
}
