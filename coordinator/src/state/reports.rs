//! What workers report: training scalars, evaluation statistics, committed checkpoints.
use std::time::Instant;

use mtl_proto::v1::{CheckpointAck, CheckpointCommit, MetricPoint, MetricsKind, MetricsReport};

use super::JobState;
use crate::checkpoints::{self, Checkpoint};
use crate::CoordinatorError;

impl JobState {
    /// Records a member's training scalars, or keeps its share of an evaluation.
    ///
    /// Training scalars of a member of a generation that just ended for regroup are still
    /// recorded (they arrive between the end and the member's next heartbeat): they describe
    /// steps the next generation continues from, so the history would have a gap without them.
    /// Its evaluation shares are answered [`CoordinatorError::GenerationEnded`] instead: an
    /// evaluation needs every rank of its generation, which will not all report any more.
    pub(crate) fn report_metrics(
        &mut self,
        report: MetricsReport,
        now: Instant,
    ) -> Result<(), CoordinatorError> {
        let kind = MetricsKind::try_from(report.kind).unwrap_or(MetricsKind::Unspecified);
        if kind == MetricsKind::Unspecified {
            return Err(CoordinatorError::InvalidRequest {
                field: "kind",
                message: format!("unknown metrics kind {}", report.kind),
            });
        }
        match self.touch(&report.worker_id, report.generation, now, |p| p.step = p.step.max(report.step)) {
            Ok(()) if kind == MetricsKind::Eval => return self.collect_eval(report),
            Ok(()) => {}
            Err(CoordinatorError::GenerationEnded { .. }) if kind == MetricsKind::Train => {}
            Err(err) => return Err(err),
        }
        let mut keys: Vec<(&String, &f64)> = report.scalars.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let values: String = keys.iter().map(|(k, v)| format!("{k}={v:.5} ")).collect();
        tracing::info!(
            rank = report.rank,
            step = report.step,
            epoch = report.epoch,
            values = values.trim_end(),
            "train"
        );
        self.history.record(
            MetricPoint {
                kind: kind as i32,
                step: report.step,
                epoch: report.epoch,
                values: report.scalars,
                rank: report.rank,
                generation: report.generation,
            },
            &mut self.store,
        );
        Ok(())
    }

    /// Keeps one rank's evaluation statistics; once every rank of the generation has sent its
    /// share for this step, merges them (in rank order) and records the finished metrics.
    fn collect_eval(&mut self, report: MetricsReport) -> Result<(), CoordinatorError> {
        let stats: mtl_metrics::EvalStats = serde_json::from_slice(&report.eval_stats_json).map_err(|e| {
            CoordinatorError::InvalidRequest {
                field: "eval_stats_json",
                message: format!("rank {}: {e}", report.rank),
            }
        })?;
        let world_size = self.generation.as_ref().map_or(0, |g| g.members.len());
        let key = (report.generation, report.step);
        let ranks = self.pending_eval.entry(key).or_default();
        ranks.insert(report.rank, stats);
        if ranks.len() < world_size {
            return Ok(());
        }
        let ranks = self.pending_eval.remove(&key).unwrap_or_default();
        let mut merged = mtl_metrics::EvalStats::default();
        for (rank, stats) in &ranks {
            merged.merge(stats).map_err(|e| CoordinatorError::InvalidRequest {
                field: "eval_stats_json",
                message: format!("rank {rank}'s statistics do not merge: {e}"),
            })?;
        }
        let map = merged.finish().to_map();
        tracing::info!(
            step = report.step,
            epoch = report.epoch,
            ranks = ranks.len(),
            "evaluation\n{}",
            mtl_metrics::render_table(&map)
        );
        if let Some(c) = self.checkpoints.iter_mut().find(|c| c.step == report.step) {
            c.metrics.extend(map.iter().map(|(k, v)| (k.clone(), *v)));
            self.store.add_checkpoint_metrics(report.step, &map)?;
        }
        self.history.record(
            MetricPoint {
                kind: MetricsKind::Eval as i32,
                step: report.step,
                epoch: report.epoch,
                values: map.into_iter().collect(),
                rank: 0,
                generation: report.generation,
            },
            &mut self.store,
        );
        Ok(())
    }

    /// Records a checkpoint that a member wrote, then prunes beyond `checkpoint.keep_last`.
    /// A commit of a step already recorded replaces that record (the newest write wins). A
    /// commit is an admission point: once it is recorded, workers waiting to join end the
    /// generation (see `admission`).
    pub(crate) fn commit_checkpoint(
        &mut self,
        req: &CheckpointCommit,
        now: Instant,
    ) -> Result<CheckpointAck, CoordinatorError> {
        self.touch(&req.worker_id, req.generation, now, |_| {})?;
        if req.config_hash != self.config_hash {
            return Err(CoordinatorError::ConfigHashMismatch {
                path: req.path.clone(),
                theirs: req.config_hash.clone(),
                ours: self.config_hash.clone(),
            });
        }
        let resolved = checkpoints::resolve(&self.checkpoint_dir, &req.path)
            .map_err(|message| CoordinatorError::InvalidRequest { field: "path", message })?;
        let checkpoint = Checkpoint {
            step: req.step,
            epoch: req.epoch,
            epoch_position: req.epoch_position,
            generation: req.generation,
            path: req.path.clone(),
            resolved,
            metrics: self.history.at_step(req.step),
            pruned: false,
        };
        self.store.insert_checkpoint(&checkpoint)?;
        tracing::info!(step = req.step, epoch = req.epoch, epoch_position = req.epoch_position, path = %req.path, "checkpoint committed");
        self.checkpoints.retain(|c| c.step != req.step);
        let at = self.checkpoints.partition_point(|c| c.step < req.step);
        self.checkpoints.insert(at, checkpoint);
        let pruned = self.prune()?;
        // The checkpoint of the last step, or of a stop on request, is no admission point: the
        // members leave after it.
        if req.step < self.cfg.train.steps && !req.stopping && self.stopping.is_none() {
            self.admit_waiting(&format!("after checkpoint step {}", req.step), now)?;
        }
        Ok(CheckpointAck { committed: true, pruned })
    }

    /// Deletes the directories of checkpoints beyond `keep_last` (never the best by
    /// `keep_best`, never the one the current generation resumed from). A directory that
    /// cannot be deleted is logged and tried again after the next commit.
    fn prune(&mut self) -> Result<Vec<String>, CoordinatorError> {
        let protected = self.generation.as_ref().and_then(|g| g.resume.as_ref()).map(|c| c.step);
        let c = &self.cfg.checkpoint;
        let steps = checkpoints::to_prune(&self.checkpoints, c.keep_last, c.keep_best_key(), protected);
        let mut pruned = Vec::new();
        for step in steps {
            let Some(c) = self.checkpoints.iter_mut().find(|c| c.step == step) else { continue };
            match std::fs::remove_dir_all(&c.resolved) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(path = %c.resolved.display(), %err, "cannot prune a checkpoint");
                    continue;
                }
            }
            c.pruned = true;
            tracing::info!(step, path = %c.resolved.display(), "checkpoint pruned");
            pruned.push(c.path.clone());
            self.store.mark_pruned(step)?;
        }
        Ok(pruned)
    }
}
