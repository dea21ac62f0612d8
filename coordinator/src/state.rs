//! The job's state machine: rendezvous into generations, liveness, metrics history, completion.
//! Pure logic behind a mutex; the gRPC service only translates requests into these calls, and
//! time is passed in (`now`) so liveness is testable without sleeping.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mtl_job::JobConfig;
use mtl_proto::v1::{
    Directive, JobStatus, MetricPoint, MetricsKind, MetricsReport, Peer, RegisterResponse, ShardRequest,
    ShardResponse, Split, WorkerStatus,
};

use crate::CoordinatorError;
use mtl_job::sharding;

/// Where the job is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `min_workers` registrations.
    Rendezvous,
    /// A generation is training.
    Running,
    /// Every worker left successfully.
    Finished,
    /// A worker failed or was lost; the message says which and why.
    Failed(String),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Rendezvous => "rendezvous",
            Phase::Running => "running",
            Phase::Finished => "finished",
            Phase::Failed(_) => "failed",
        }
    }
}

/// What a registration did to the rendezvous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registered {
    /// Still waiting for workers.
    Waiting,
    /// Enough workers: the generation forms when this last call ends.
    LastCall(Instant),
    /// The generation formed.
    Formed,
}

/// What a worker said about itself when registering.
#[derive(Debug, Clone)]
pub(crate) struct WorkerInfo {
    pub(crate) worker_id: String,
    pub(crate) host: String,
    pub(crate) device: String,
    pub(crate) peer_addr: String,
    pub(crate) nccl_unique_id: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberState {
    Active,
    Left,
    Failed,
    Lost,
}

#[derive(Debug)]
struct Member {
    info: WorkerInfo,
    state: MemberState,
    last_seen: Instant,
    last_step: u64,
}

#[derive(Debug)]
struct Generation {
    id: u64,
    /// Ordered by rank.
    members: Vec<Member>,
}

/// The whole mutable state of one job.
#[derive(Debug)]
pub(crate) struct JobState {
    cfg: JobConfig,
    config_toml: String,
    phase: Phase,
    pending: BTreeMap<String, WorkerInfo>,
    generation: Option<Generation>,
    next_generation: u64,
    history: Vec<MetricPoint>,
    /// Per split: (samples, fingerprint, first worker that reported them).
    datasets: BTreeMap<i32, (u64, String, String)>,
    /// Samples of the current train epoch consumed before this generation started.
    epoch_position: (u64, u64),
    /// When the rendezvous closes, once `min_workers` are in and more may still come.
    last_call: Option<Instant>,
    /// Evaluation statistics waiting for the other ranks: (generation, step) -> rank -> stats.
    pending_eval: BTreeMap<(u64, u64), BTreeMap<u32, mtl_metrics::EvalStats>>,
    /// Train epochs started: epoch -> optimizer steps completed before it (from rank 0).
    epoch_start: BTreeMap<u64, u64>,
    /// Where every metrics point is appended as a JSON line.
    metrics_file: std::fs::File,
    metrics_path: std::path::PathBuf,
}

impl JobState {
    /// A fresh job; creates (appends to) the metrics file, naming it if that fails.
    pub(crate) fn new(cfg: JobConfig) -> Result<Self, CoordinatorError> {
        let config_toml = cfg.to_toml();
        let metrics_path = cfg.server.metrics_path(&cfg.job.name);
        let io = |source| CoordinatorError::Io { path: metrics_path.clone(), source };
        if let Some(dir) = metrics_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let metrics_file =
            std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(io)?;
        Ok(Self {
            cfg,
            config_toml,
            phase: Phase::Rendezvous,
            pending: BTreeMap::new(),
            generation: None,
            next_generation: 1,
            history: Vec::new(),
            datasets: BTreeMap::new(),
            epoch_position: (0, 0),
            last_call: None,
            pending_eval: BTreeMap::new(),
            epoch_start: BTreeMap::new(),
            metrics_file,
            metrics_path,
        })
    }

    /// Adds a point to the history and appends it to the metrics file. A failed write is
    /// logged, not fatal: the in-memory history (and `Status`) still has it.
    fn record(&mut self, point: MetricPoint) {
        use std::io::Write;
        let kind = if point.kind == MetricsKind::Eval as i32 { "eval" } else { "train" };
        let values: BTreeMap<&String, &f64> = point.values.iter().collect();
        let line = format!(
            "{{\"kind\":\"{kind}\",\"generation\":{},\"epoch\":{},\"step\":{},\"rank\":{},\"values\":{}}}\n",
            point.generation,
            point.epoch,
            point.step,
            point.rank,
            serde_json::to_string(&values).expect("metric values serialise")
        );
        if let Err(err) = self.metrics_file.write_all(line.as_bytes()) {
            tracing::error!(path = %self.metrics_path.display(), %err, "cannot append to the metrics file");
        }
        self.history.push(point);
    }

    pub(crate) fn phase(&self) -> &Phase {
        &self.phase
    }

    pub(crate) fn check_token(&self, token: &str) -> Result<(), CoordinatorError> {
        if self.cfg.job.token.is_empty() || self.cfg.job.token == token {
            Ok(())
        } else {
            Err(CoordinatorError::BadToken)
        }
    }

    /// Errors once the job has finished or failed.
    pub(crate) fn ensure_open(&self) -> Result<(), CoordinatorError> {
        match self.phase {
            Phase::Finished => Err(CoordinatorError::JobOver { state: "finished" }),
            Phase::Failed(_) => Err(CoordinatorError::JobOver { state: "failed" }),
            _ => Ok(()),
        }
    }

    /// Adds a worker to the rendezvous. The generation forms at once when `max_workers` are in;
    /// with at least `min_workers` it forms when the last call (`rendezvous.last_call_ms`)
    /// ends, see [`JobState::close_rendezvous`].
    pub(crate) fn register(
        &mut self,
        info: WorkerInfo,
        now: Instant,
    ) -> Result<Registered, CoordinatorError> {
        self.ensure_open()?;
        if info.worker_id.is_empty() {
            return Err(CoordinatorError::InvalidRequest {
                field: "worker_id",
                message: "must not be empty".into(),
            });
        }
        if let Some(generation) = &self.generation {
            if generation.members.iter().any(|m| m.info.worker_id == info.worker_id) {
                return Ok(Registered::Waiting); // a retried registration: the placement stands
            }
            return Err(CoordinatorError::Full {
                job: self.cfg.job.name.clone(),
                generation: generation.id,
                world_size: generation.members.len() as u32,
                max: self.cfg.rendezvous.max_workers(),
                worker_id: info.worker_id,
            });
        }
        tracing::info!(worker_id = %info.worker_id, host = %info.host, device = %info.device, "worker registered");
        self.pending.insert(info.worker_id.clone(), info);
        let r = &self.cfg.rendezvous;
        let (min, max) = (r.min_workers as usize, r.max_workers() as usize);
        let last_call = std::time::Duration::from_millis(r.last_call_ms);
        if self.pending.len() >= max || (self.pending.len() >= min && last_call.is_zero()) {
            self.form_generation(now);
            return Ok(Registered::Formed);
        }
        if self.pending.len() >= min && self.last_call.is_none() {
            let deadline = now + last_call;
            self.last_call = Some(deadline);
            tracing::info!(
                registered = self.pending.len(),
                max,
                last_call_ms = r.last_call_ms,
                "last call for workers"
            );
            return Ok(Registered::LastCall(deadline));
        }
        Ok(Registered::Waiting)
    }

    /// Forms the generation if the last call has ended. Returns whether it did.
    pub(crate) fn close_rendezvous(&mut self, now: Instant) -> bool {
        match self.last_call {
            Some(deadline) if now >= deadline && self.generation.is_none() => {
                self.form_generation(now);
                true
            }
            _ => false,
        }
    }

    /// Ranks follow the order of worker ids, so a restarted node keeps its rank.
    fn form_generation(&mut self, now: Instant) {
        let max = self.cfg.rendezvous.max_workers() as usize;
        let members: Vec<Member> = std::mem::take(&mut self.pending)
            .into_values()
            .take(max)
            .map(|info| Member { info, state: MemberState::Active, last_seen: now, last_step: 0 })
            .collect();
        let id = self.next_generation;
        self.next_generation += 1;
        tracing::info!(generation = id, world_size = members.len(), "generation formed");
        self.generation = Some(Generation { id, members });
        self.phase = Phase::Running;
        self.last_call = None;
    }

    /// This worker's place in the current generation, once formed.
    pub(crate) fn placement(&self, worker_id: &str) -> Option<RegisterResponse> {
        let generation = self.generation.as_ref()?;
        let rank = generation.members.iter().position(|m| m.info.worker_id == worker_id)?;
        let peers = generation
            .members
            .iter()
            .enumerate()
            .map(|(rank, m)| Peer {
                rank: rank as u32,
                worker_id: m.info.worker_id.clone(),
                peer_addr: m.info.peer_addr.clone(),
                device: m.info.device.clone(),
            })
            .collect();
        Some(RegisterResponse {
            generation: generation.id,
            rank: rank as u32,
            world_size: generation.members.len() as u32,
            peers,
            job_config_toml: self.config_toml.clone(),
            heartbeat_interval_ms: self.cfg.rendezvous.heartbeat_interval_ms,
            nccl_unique_id: generation.members[0].info.nccl_unique_id.clone(),
        })
    }

    pub(crate) fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Forgets a worker that gave up waiting in the rendezvous.
    pub(crate) fn withdraw(&mut self, worker_id: &str) {
        self.pending.remove(worker_id);
    }

    fn member_mut(&mut self, worker_id: &str, generation: u64) -> Result<&mut Member, CoordinatorError> {
        let unknown = || CoordinatorError::UnknownWorker { worker_id: worker_id.to_string(), generation };
        let g = self.generation.as_mut().filter(|g| g.id == generation).ok_or_else(unknown)?;
        g.members.iter_mut().find(|m| m.info.worker_id == worker_id).ok_or_else(unknown)
    }

    pub(crate) fn heartbeat(
        &mut self,
        worker_id: &str,
        generation: u64,
        step: u64,
        now: Instant,
    ) -> Result<(Directive, String), CoordinatorError> {
        let member = self.member_mut(worker_id, generation)?;
        member.last_seen = now;
        member.last_step = member.last_step.max(step);
        Ok(match &self.phase {
            Phase::Failed(reason) => (Directive::Stop, reason.clone()),
            Phase::Finished => (Directive::Stop, "job finished".into()),
            _ => (Directive::Continue, String::new()),
        })
    }

    /// Marks members silent for longer than the heartbeat timeout as lost, which ends the
    /// generation. Returns the ids of newly lost workers.
    pub(crate) fn check_liveness(&mut self, now: Instant) -> Vec<String> {
        let timeout = Duration::from_millis(self.cfg.rendezvous.heartbeat_timeout_ms);
        let Some(generation) = self.generation.as_mut() else { return Vec::new() };
        let mut lost = Vec::new();
        for m in generation.members.iter_mut().filter(|m| m.state == MemberState::Active) {
            if now.saturating_duration_since(m.last_seen) > timeout {
                m.state = MemberState::Lost;
                lost.push(m.info.worker_id.clone());
            }
        }
        if !lost.is_empty() && matches!(self.phase, Phase::Running) {
            let reason = format!(
                "worker(s) {} sent no heartbeat for {} ms; generation {} ended",
                lost.join(", "),
                timeout.as_millis(),
                generation.id
            );
            tracing::error!(%reason, "worker lost");
            self.phase = Phase::Failed(reason);
        }
        lost
    }

    /// This rank's samples for one epoch of one split; checks every rank sees the same data.
    pub(crate) fn shard(&mut self, req: &ShardRequest) -> Result<ShardResponse, CoordinatorError> {
        let split = Split::try_from(req.split).unwrap_or(Split::Unspecified);
        if split == Split::Unspecified {
            return Err(CoordinatorError::InvalidRequest {
                field: "split",
                message: format!("unknown split {}", req.split),
            });
        }
        let generation = self.generation.as_ref().filter(|g| g.id == req.generation);
        let (rank, world_size) = generation
            .and_then(|g| {
                let rank = g.members.iter().position(|m| m.info.worker_id == req.worker_id)?;
                Some((rank as u32, g.members.len() as u32))
            })
            .ok_or_else(|| CoordinatorError::UnknownWorker {
                worker_id: req.worker_id.clone(),
                generation: req.generation,
            })?;
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
        Ok(match split {
            Split::Val => ShardResponse {
                epoch: req.epoch,
                positions: sharding::val_shard(n, world_size, rank),
                batch_size,
                steps: 0,
                epoch_position: 0,
            },
            _ => {
                if rank == 0 {
                    self.epoch_start.entry(req.epoch).or_insert(req.steps_done);
                }
                let consumed = if self.epoch_position.0 == req.epoch { self.epoch_position.1 } else { 0 };
                let shard = sharding::train_shard(sharding::ShardSpec {
                    samples: n,
                    seed: self.cfg.job.seed,
                    epoch: req.epoch,
                    consumed,
                    world_size,
                    rank,
                    batch_size,
                });
                ShardResponse {
                    epoch: req.epoch,
                    positions: shard.positions,
                    batch_size,
                    steps: shard.steps,
                    epoch_position: consumed,
                }
            }
        })
    }

    pub(crate) fn report_metrics(
        &mut self,
        report: MetricsReport,
        now: Instant,
    ) -> Result<(), CoordinatorError> {
        let member = self.member_mut(&report.worker_id, report.generation)?;
        member.last_seen = now;
        member.last_step = member.last_step.max(report.step);
        let kind = MetricsKind::try_from(report.kind).unwrap_or(MetricsKind::Unspecified);
        if kind == MetricsKind::Unspecified {
            return Err(CoordinatorError::InvalidRequest {
                field: "kind",
                message: format!("unknown metrics kind {}", report.kind),
            });
        }
        if kind == MetricsKind::Eval {
            return self.collect_eval(report);
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
        self.record(MetricPoint {
            kind: kind as i32,
            step: report.step,
            epoch: report.epoch,
            values: report.scalars,
            rank: report.rank,
            generation: report.generation,
        });
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
        self.record(MetricPoint {
            kind: MetricsKind::Eval as i32,
            step: report.step,
            epoch: report.epoch,
            values: map.into_iter().collect(),
            rank: 0,
            generation: report.generation,
        });
        Ok(())
    }

    /// A worker is done (or failed). The job finishes when every member has left.
    pub(crate) fn leave(
        &mut self,
        worker_id: &str,
        generation: u64,
        failed: bool,
        message: &str,
    ) -> Result<(), CoordinatorError> {
        let member = self.member_mut(worker_id, generation)?;
        member.state = if failed { MemberState::Failed } else { MemberState::Left };
        if failed {
            let reason = format!("worker `{worker_id}` failed: {message}");
            tracing::error!(%reason, "worker failed");
            if !matches!(self.phase, Phase::Failed(_)) {
                self.phase = Phase::Failed(reason);
            }
        } else {
            tracing::info!(worker_id, "worker left");
        }
        let all_left = self
            .generation
            .as_ref()
            .is_some_and(|g| g.members.iter().all(|m| m.state != MemberState::Active));
        if all_left && matches!(self.phase, Phase::Running) {
            self.phase = Phase::Finished;
            tracing::info!(job = %self.cfg.job.name, "job finished");
        }
        Ok(())
    }

    pub(crate) fn status(&self) -> JobStatus {
        // Samples of the current epoch consumed by all ranks: steps since it began x global batch.
        let (epoch, epoch_position) = match (self.epoch_start.last_key_value(), &self.generation) {
            (Some((&epoch, &start)), Some(g)) => {
                let steps = g.members[0].last_step.saturating_sub(start);
                let global_batch = g.members.len() as u64 * u64::from(self.cfg.train.batch_size);
                let resumed = if self.epoch_position.0 == epoch { self.epoch_position.1 } else { 0 };
                (epoch, resumed + steps * global_batch)
            }
            _ => (0, 0),
        };
        let mut workers: Vec<WorkerStatus> = self
            .pending
            .values()
            .map(|info| WorkerStatus {
                worker_id: info.worker_id.clone(),
                rank: 0,
                host: info.host.clone(),
                device: info.device.clone(),
                state: "waiting".into(),
                last_step: 0,
            })
            .collect();
        if let Some(g) = &self.generation {
            workers.extend(g.members.iter().enumerate().map(|(rank, m)| WorkerStatus {
                worker_id: m.info.worker_id.clone(),
                rank: rank as u32,
                host: m.info.host.clone(),
                device: m.info.device.clone(),
                state: format!("{:?}", m.state).to_lowercase(),
                last_step: m.last_step,
            }));
        }
        JobStatus {
            job_name: self.cfg.job.name.clone(),
            state: self.phase.name().into(),
            generation: self.generation.as_ref().map_or(0, |g| g.id),
            world_size: self.generation.as_ref().map_or(0, |g| g.members.len() as u32),
            workers,
            history: self.history.clone(),
            message: match &self.phase {
                Phase::Failed(reason) => reason.clone(),
                _ => String::new(),
            },
            epoch,
            epoch_position,
        }
    }
}

#[cfg(test)]
mod tests;
