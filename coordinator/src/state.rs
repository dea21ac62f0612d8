//! The job's state machine: rendezvous into generations, re-attach after a restart, liveness,
//! sample accounting, checkpoint commits, completion. Pure logic behind a mutex; the gRPC
//! service only translates requests into these calls, and time is passed in (`now`) so
//! liveness is testable without sleeping. Every durable change goes to the [`Store`] as it
//! happens, and [`JobState::new`] reloads it.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mtl_job::{sharding, JobConfig};
use mtl_proto::v1::{
    CheckpointAck, CheckpointCommit, Directive, JobEvent, JobStatus, MetricPoint, MetricsKind, MetricsReport,
    Peer, RegisterResponse, ShardRequest, ShardResponse, Split, WorkerPhase, WorkerStatus,
};

use crate::accounting::{Accounting, SegmentStart};
use crate::checkpoints::{self, Checkpoint};
use crate::history::History;
use crate::store::{unix_ms, Store, StoredOutcome};
use crate::CoordinatorError;

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
    /// A worker of the running generation re-attached: its placement stands.
    Reattached,
}

/// What a worker said about itself when registering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WorkerInfo {
    pub(crate) worker_id: String,
    pub(crate) host: String,
    pub(crate) device: String,
    pub(crate) peer_addr: String,
    pub(crate) nccl_unique_id: Vec<u8>,
}

/// What a heartbeat reports.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    /// Optimizer steps completed.
    pub(crate) step: u64,
    pub(crate) phase: WorkerPhase,
    pub(crate) collective_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberState {
    Active,
    /// Restored after a coordinator restart, not heard from since.
    Detached,
    Left,
    Failed,
    Lost,
}

#[derive(Debug)]
struct Member {
    info: WorkerInfo,
    state: MemberState,
    last_seen: Instant,
    progress: Progress,
}

#[derive(Debug)]
struct Generation {
    id: u64,
    /// Ordered by rank.
    members: Vec<Member>,
    /// The committed checkpoint it started from.
    resume: Option<Checkpoint>,
}

impl Generation {
    fn rank_of(&self, worker_id: &str) -> Option<usize> {
        self.members.iter().position(|m| m.info.worker_id == worker_id)
    }
}

/// Events kept for `Status`; the store keeps them all.
const STATUS_EVENTS: usize = 100;

/// The whole mutable state of one job.
#[derive(Debug)]
pub(crate) struct JobState {
    cfg: JobConfig,
    config_toml: String,
    config_hash: String,
    checkpoint_dir: PathBuf,
    phase: Phase,
    pending: BTreeMap<String, WorkerInfo>,
    generation: Option<Generation>,
    /// The generation that ended last and why, so its members hear it in their heartbeats.
    ended: Option<(Generation, String)>,
    next_generation: u64,
    store: Store,
    history: History,
    events: Vec<JobEvent>,
    accounting: Accounting,
    /// Committed checkpoints by step.
    checkpoints: Vec<Checkpoint>,
    /// Per split: (samples, fingerprint, first worker that reported them).
    datasets: BTreeMap<i32, (u64, String, String)>,
    /// When the rendezvous closes, once `min_workers` are in and more may still come.
    last_call: Option<Instant>,
    /// Until when the members of a restored generation may re-attach.
    reattach_deadline: Option<Instant>,
    /// Evaluation statistics waiting for the other ranks: (generation, step) -> rank -> stats.
    pending_eval: BTreeMap<(u64, u64), BTreeMap<u32, mtl_metrics::EvalStats>>,
}

impl JobState {
    /// Opens the job: its state database (resuming what it holds) and its metrics export.
    /// A restored running generation waits for its members to re-attach until
    /// `now + rendezvous.coordinator_grace_ms`.
    pub(crate) fn new(cfg: JobConfig, now: Instant) -> Result<Self, CoordinatorError> {
        let config_hash = cfg.hash();
        let (store, restored) =
            Store::open(&cfg.server.state_db_path(&cfg.job.name), &cfg.job.name, &config_hash)?;
        let fresh = restored.is_none();
        let restored = restored.unwrap_or_default();
        let history = History::open(cfg.server.metrics_path(&cfg.job.name), restored.history)?;
        let mut state = Self {
            config_toml: cfg.to_toml(),
            config_hash,
            checkpoint_dir: cfg.checkpoint.dir_path(&cfg.job.name),
            cfg,
            phase: Phase::Rendezvous,
            pending: BTreeMap::new(),
            generation: None,
            ended: None,
            next_generation: restored.generations.last().map_or(1, |g| g.id + 1),
            store,
            history,
            events: restored.events,
            accounting: Accounting::new(restored.segments),
            checkpoints: restored.checkpoints,
            datasets: BTreeMap::new(),
            last_call: None,
            reattach_deadline: None,
            pending_eval: BTreeMap::new(),
        };
        if !fresh {
            state.restore(restored.outcome, restored.generations, now)?;
        }
        Ok(state)
    }

    /// Picks the job up where the store left it.
    fn restore(
        &mut self,
        outcome: Option<StoredOutcome>,
        generations: Vec<crate::store::StoredGeneration>,
        now: Instant,
    ) -> Result<(), CoordinatorError> {
        let path = self.store.path().display().to_string();
        if outcome == Some(StoredOutcome::Finished) {
            tracing::info!(state_db = %path, "the job already finished");
            self.phase = Phase::Finished;
            return Ok(());
        }
        let running = generations.into_iter().last().filter(|g| g.end_cause.is_none());
        let detail = match running {
            Some(g) => {
                let grace = Duration::from_millis(self.cfg.rendezvous.coordinator_grace_ms);
                let resume =
                    g.resume_step.and_then(|step| self.checkpoints.iter().find(|c| c.step == step).cloned());
                let members = g
                    .members
                    .into_iter()
                    .map(|info| Member {
                        info,
                        state: MemberState::Detached,
                        last_seen: now,
                        progress: Progress::default(),
                    })
                    .collect::<Vec<_>>();
                let detail = format!(
                    "coordinator restarted from {path}: the {} workers of generation {} have {} ms to re-attach",
                    members.len(),
                    g.id,
                    grace.as_millis()
                );
                self.generation = Some(Generation { id: g.id, members, resume });
                self.reattach_deadline = Some(now + grace);
                self.phase = Phase::Running;
                detail
            }
            None => {
                if outcome.is_some() {
                    self.store.set_outcome(None)?; // a failed job goes on from its checkpoint
                }
                match self.newest_checkpoint() {
                    Some(c) => format!(
                        "coordinator restarted from {path}: the next generation resumes from checkpoint step {} ({})",
                        c.step, c.path
                    ),
                    None => format!("coordinator restarted from {path}: no committed checkpoint, the next generation starts afresh"),
                }
            }
        };
        let generation = self.generation.as_ref().map_or(0, |g| g.id);
        self.log_event(generation, "coordinator_restarted", detail)
    }

    fn log_event(&mut self, generation: u64, kind: &str, detail: String) -> Result<(), CoordinatorError> {
        tracing::info!(generation, kind, %detail, "job event");
        let event = JobEvent { at_unix_ms: unix_ms(), generation, kind: kind.into(), detail };
        self.store.insert_event(&event)?;
        self.events.push(event);
        Ok(())
    }

    fn newest_checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoints.iter().filter(|c| !c.pruned).max_by_key(|c| c.step)
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

    /// Adds a worker to the rendezvous, or re-attaches it when it names its generation
    /// (`generation` > 0). The generation forms at once when `max_workers` are in; with at
    /// least `min_workers` it forms when the last call (`rendezvous.last_call_ms`) ends, see
    /// [`JobState::close_rendezvous`].
    pub(crate) fn register(
        &mut self,
        info: WorkerInfo,
        generation: u64,
        step: u64,
        now: Instant,
    ) -> Result<Registered, CoordinatorError> {
        self.ensure_open()?;
        if info.worker_id.is_empty() {
            return Err(CoordinatorError::InvalidRequest {
                field: "worker_id",
                message: "must not be empty".into(),
            });
        }
        if generation != 0 {
            return self.reattach(&info.worker_id, generation, step, now);
        }
        if let Some(g) = &self.generation {
            match g.members.iter().find(|m| m.info.worker_id == info.worker_id) {
                // A process of a restored generation that registers afresh has lost its state:
                // the generation cannot go on, the next one starts from the checkpoint.
                Some(m) if m.state == MemberState::Detached => {
                    let reason = format!(
                        "worker `{}` registered afresh (its process restarted) while generation {} waited for \
                         its workers to re-attach",
                        info.worker_id, g.id
                    );
                    self.end_generation(reason)?;
                    self.phase = Phase::Rendezvous;
                }
                Some(_) => return Ok(Registered::Waiting), // a retried registration: the placement stands
                None => {
                    return Err(CoordinatorError::Full {
                        job: self.cfg.job.name.clone(),
                        generation: g.id,
                        world_size: g.members.len() as u32,
                        max: self.cfg.rendezvous.max_workers(),
                        worker_id: info.worker_id,
                    })
                }
            }
        }
        tracing::info!(worker_id = %info.worker_id, host = %info.host, device = %info.device, "worker registered");
        self.pending.insert(info.worker_id.clone(), info);
        let r = &self.cfg.rendezvous;
        let (min, max) = (r.min_workers as usize, r.max_workers() as usize);
        let last_call = Duration::from_millis(r.last_call_ms);
        if self.pending.len() >= max || (self.pending.len() >= min && last_call.is_zero()) {
            self.form_generation(now)?;
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

    /// A worker of `generation` is back (the coordinator restarted, or it lost the connection).
    fn reattach(
        &mut self,
        worker_id: &str,
        generation: u64,
        step: u64,
        now: Instant,
    ) -> Result<Registered, CoordinatorError> {
        let stale = |current: Option<u64>| CoordinatorError::StaleGeneration {
            worker_id: worker_id.to_string(),
            generation,
            current: current.map_or_else(|| "no generation".into(), |c| format!("generation {c}")),
        };
        let current = self.generation.as_ref().map(|g| g.id);
        let attachable = self
            .generation
            .as_ref()
            .filter(|g| g.id == generation)
            .and_then(|g| g.members.iter().find(|m| m.info.worker_id == worker_id))
            .is_some_and(|m| matches!(m.state, MemberState::Active | MemberState::Detached));
        if !attachable {
            return Err(stale(current));
        }
        self.touch(worker_id, generation, now, |p| p.step = p.step.max(step))?;
        Ok(Registered::Reattached)
    }

    /// A member was heard from: refreshes its liveness and progress; a detached member
    /// re-attaches; rank 0's steps advance the epoch accounting.
    fn touch(
        &mut self,
        worker_id: &str,
        generation: u64,
        now: Instant,
        update: impl FnOnce(&mut Progress),
    ) -> Result<(), CoordinatorError> {
        let (rank, member) = self.member_mut(worker_id, generation)?;
        member.last_seen = now;
        update(&mut member.progress);
        let step = member.progress.step;
        let reattached = member.state == MemberState::Detached;
        if reattached {
            member.state = MemberState::Active;
        }
        if reattached {
            let detail = format!("worker `{worker_id}` (rank {rank}) re-attached at step {step}");
            self.log_event(generation, "reattached", detail)?;
            if self
                .generation
                .as_ref()
                .is_some_and(|g| g.members.iter().all(|m| m.state != MemberState::Detached))
            {
                self.reattach_deadline = None;
            }
        }
        if rank == 0 {
            if let Some(segment) = self.accounting.advance(generation, step) {
                self.store.put_segment(&segment)?;
            }
        }
        Ok(())
    }

    /// Forms the generation if the last call has ended. Returns whether it did.
    pub(crate) fn close_rendezvous(&mut self, now: Instant) -> Result<bool, CoordinatorError> {
        match self.last_call {
            Some(deadline) if now >= deadline && self.generation.is_none() => {
                self.form_generation(now)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Ranks follow the order of worker ids, so a restarted node keeps its rank. The new
    /// generation resumes from the newest committed checkpoint, if any.
    fn form_generation(&mut self, now: Instant) -> Result<(), CoordinatorError> {
        let max = self.cfg.rendezvous.max_workers() as usize;
        let members: Vec<Member> = std::mem::take(&mut self.pending)
            .into_values()
            .take(max)
            .map(|info| Member {
                info,
                state: MemberState::Active,
                last_seen: now,
                progress: Progress::default(),
            })
            .collect();
        let id = self.next_generation;
        self.next_generation += 1;
        let resume = self.newest_checkpoint().cloned();
        let ids: Vec<&str> = members.iter().map(|m| m.info.worker_id.as_str()).collect();
        let mut detail = format!("{} worker(s) in rank order: {}", ids.len(), ids.join(", "));
        match &resume {
            Some(c) => detail += &format!("; resumes from checkpoint step {} ({})", c.step, c.path),
            None => detail += "; starts afresh",
        }
        if let Some((g, reason)) = &self.ended {
            detail += &format!("; after generation {} ended: {reason}", g.id);
        }
        let event = JobEvent { at_unix_ms: unix_ms(), generation: id, kind: "formed".into(), detail };
        let infos: Vec<WorkerInfo> = members.iter().map(|m| m.info.clone()).collect();
        self.store.insert_generation(id, &infos, &event, resume.as_ref().map(|c| c.step))?;
        tracing::info!(generation = id, world_size = members.len(), detail = %event.detail, "generation formed");
        self.events.push(event);
        self.generation = Some(Generation { id, members, resume });
        self.phase = Phase::Running;
        self.last_call = None;
        Ok(())
    }

    /// Ends the running generation with `reason` (logged, stored, told to its members).
    fn end_generation(&mut self, reason: String) -> Result<(), CoordinatorError> {
        let Some(g) = self.generation.take() else { return Ok(()) };
        let event = JobEvent {
            at_unix_ms: unix_ms(),
            generation: g.id,
            kind: "ended".into(),
            detail: reason.clone(),
        };
        tracing::info!(generation = g.id, %reason, "generation ended");
        self.store.end_generation(&event)?;
        self.events.push(event);
        self.reattach_deadline = None;
        self.ended = Some((g, reason));
        Ok(())
    }

    /// Ends the job as failed: the generation ends with the reason, which the store keeps.
    fn fail(&mut self, reason: String) -> Result<(), CoordinatorError> {
        if matches!(self.phase, Phase::Failed(_) | Phase::Finished) {
            return Ok(());
        }
        tracing::error!(%reason, "job failed");
        self.phase = Phase::Failed(reason.clone());
        self.end_generation(reason.clone())?;
        self.store.set_outcome(Some(&StoredOutcome::Failed(reason)))
    }

    /// This worker's place in the current generation, once formed.
    pub(crate) fn placement(&self, worker_id: &str) -> Option<RegisterResponse> {
        let generation = self.generation.as_ref()?;
        let rank = generation.rank_of(worker_id)?;
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
            resume: generation.resume.as_ref().map(Checkpoint::resume),
            config_hash: self.config_hash.clone(),
            reattached: false,
        })
    }

    pub(crate) fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Forgets a worker that gave up waiting in the rendezvous.
    pub(crate) fn withdraw(&mut self, worker_id: &str) {
        self.pending.remove(worker_id);
    }

    /// The member `worker_id` of the current generation `generation`, with its rank.
    fn member_mut(
        &mut self,
        worker_id: &str,
        generation: u64,
    ) -> Result<(usize, &mut Member), CoordinatorError> {
        let unknown = || CoordinatorError::UnknownWorker { worker_id: worker_id.to_string(), generation };
        let g = self.generation.as_mut().filter(|g| g.id == generation).ok_or_else(unknown)?;
        let rank = g.rank_of(worker_id).ok_or_else(unknown)?;
        Ok((rank, &mut g.members[rank]))
    }

    /// The reason the generation `generation` ended, when `worker_id` was in it.
    fn ended_for(&self, worker_id: &str, generation: u64) -> Option<&str> {
        let (g, reason) = self.ended.as_ref()?;
        (g.id == generation && g.rank_of(worker_id).is_some()).then_some(reason.as_str())
    }

    pub(crate) fn heartbeat(
        &mut self,
        worker_id: &str,
        generation: u64,
        progress: Progress,
        now: Instant,
    ) -> Result<(Directive, String), CoordinatorError> {
        if let Some(reason) = self.ended_for(worker_id, generation) {
            let reason = match &self.phase {
                Phase::Failed(failure) => failure.clone(),
                Phase::Finished => "job finished".into(),
                _ => format!("generation {generation} ended: {reason}"),
            };
            return Ok((Directive::Stop, reason));
        }
        self.touch(worker_id, generation, now, |p| {
            *p = Progress { step: p.step.max(progress.step), ..progress };
        })?;
        Ok(match &self.phase {
            Phase::Failed(reason) => (Directive::Stop, reason.clone()),
            Phase::Finished => (Directive::Stop, "job finished".into()),
            _ => (Directive::Continue, String::new()),
        })
    }

    /// Marks members silent for longer than the heartbeat timeout as lost, and members of a
    /// restored generation that did not re-attach within the grace period; either ends the
    /// generation and fails the job. Returns the ids of newly lost workers.
    pub(crate) fn check_liveness(&mut self, now: Instant) -> Result<Vec<String>, CoordinatorError> {
        let timeout = Duration::from_millis(self.cfg.rendezvous.heartbeat_timeout_ms);
        let grace_over = self.reattach_deadline.is_some_and(|d| now >= d);
        let Some(generation) = self.generation.as_mut() else { return Ok(Vec::new()) };
        let (mut silent, mut detached) = (Vec::new(), Vec::new());
        for m in &mut generation.members {
            if m.state == MemberState::Active && now.saturating_duration_since(m.last_seen) > timeout {
                m.state = MemberState::Lost;
                silent.push(m.info.worker_id.clone());
            } else if m.state == MemberState::Detached && grace_over {
                m.state = MemberState::Lost;
                detached.push(m.info.worker_id.clone());
            }
        }
        let id = generation.id;
        if silent.is_empty() && detached.is_empty() {
            return Ok(Vec::new());
        }
        if matches!(self.phase, Phase::Running) {
            let reason = if silent.is_empty() {
                format!(
                    "worker(s) {} did not re-attach within rendezvous.coordinator_grace_ms = {} after the \
                     coordinator restarted; generation {id} ended",
                    detached.join(", "),
                    self.cfg.rendezvous.coordinator_grace_ms
                )
            } else {
                format!(
                    "worker(s) {} sent no heartbeat for {} ms; generation {id} ended",
                    silent.join(", "),
                    timeout.as_millis()
                )
            };
            self.fail(reason)?;
        }
        silent.extend(detached);
        Ok(silent)
    }

    /// This rank's samples for one epoch of one split; checks every rank sees the same data
    /// and, for training, records which part of the epoch this generation trains.
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
            .and_then(|g| Some((g.rank_of(&req.worker_id)? as u32, g.members.len() as u32)))
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
        if split == Split::Val {
            return Ok(ShardResponse {
                epoch: req.epoch,
                positions: sharding::val_shard(n, world_size, rank),
                batch_size,
                steps: 0,
                epoch_position: 0,
            });
        }
        let consumed = self.segment_start(req, rank, world_size)?;
        let shard = sharding::train_shard(sharding::ShardSpec {
            samples: n,
            seed: self.cfg.job.seed,
            epoch: req.epoch,
            consumed,
            world_size,
            rank,
            batch_size,
        });
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
        self.touch(&report.worker_id, report.generation, now, |p| p.step = p.step.max(report.step))?;
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
    /// A commit of a step already recorded replaces that record (the newest write wins).
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

    /// A worker is done (or failed). The job finishes when every member has left.
    pub(crate) fn leave(
        &mut self,
        worker_id: &str,
        generation: u64,
        failed: bool,
        message: &str,
    ) -> Result<(), CoordinatorError> {
        let state = if failed { MemberState::Failed } else { MemberState::Left };
        match self.member_mut(worker_id, generation) {
            Ok((_, member)) => member.state = state,
            // A member of the generation that just ended (it heard why, and leaves).
            Err(err) => {
                let (g, _) = self.ended.as_mut().filter(|(g, _)| g.id == generation).ok_or(err)?;
                let rank = g.rank_of(worker_id).ok_or(CoordinatorError::UnknownWorker {
                    worker_id: worker_id.to_string(),
                    generation,
                })?;
                g.members[rank].state = state;
            }
        }
        if failed {
            return self.fail(format!("worker `{worker_id}` failed: {message}"));
        }
        tracing::info!(worker_id, "worker left");
        let all_left = self.generation.as_ref().is_some_and(|g| {
            g.members.iter().all(|m| !matches!(m.state, MemberState::Active | MemberState::Detached))
        });
        if all_left && matches!(self.phase, Phase::Running) {
            self.phase = Phase::Finished;
            tracing::info!(job = %self.cfg.job.name, "job finished");
            self.end_generation("job finished: every worker left".into())?;
            self.store.set_outcome(Some(&StoredOutcome::Finished))?;
        }
        Ok(())
    }

    pub(crate) fn status(&self, now: Instant) -> JobStatus {
        let shown = self.generation.as_ref().or(self.ended.as_ref().map(|(g, _)| g));
        let (epoch, epoch_position) =
            shown.and_then(|g| self.accounting.current(g.id)).map_or((0, 0), |s| (s.epoch, s.end));
        let mut workers: Vec<WorkerStatus> = self
            .pending
            .values()
            .map(|info| WorkerStatus {
                worker_id: info.worker_id.clone(),
                host: info.host.clone(),
                device: info.device.clone(),
                state: "waiting".into(),
                ..Default::default()
            })
            .collect();
        if let Some(g) = shown {
            workers.extend(g.members.iter().enumerate().map(|(rank, m)| WorkerStatus {
                worker_id: m.info.worker_id.clone(),
                rank: rank as u32,
                host: m.info.host.clone(),
                device: m.info.device.clone(),
                state: format!("{:?}", m.state).to_lowercase(),
                last_step: m.progress.step,
                phase: phase_name(m.progress.phase).into(),
                heartbeat_age_ms: now.saturating_duration_since(m.last_seen).as_millis() as u64,
                collective_seq: m.progress.collective_seq,
            }));
        }
        let skip = self.events.len().saturating_sub(STATUS_EVENTS);
        JobStatus {
            job_name: self.cfg.job.name.clone(),
            state: self.phase.name().into(),
            generation: shown.map_or(0, |g| g.id),
            world_size: shown.map_or(0, |g| g.members.len() as u32),
            workers,
            history: self.history.points().to_vec(),
            message: match &self.phase {
                Phase::Failed(reason) => reason.clone(),
                _ => String::new(),
            },
            epoch,
            epoch_position,
            events: self.events[skip..].to_vec(),
            epoch_segments: self.accounting.segments().iter().map(|s| s.to_proto()).collect(),
            checkpoints: self.checkpoints.iter().map(Checkpoint::to_proto).collect(),
            resume: shown.and_then(|g| g.resume.as_ref()).map(Checkpoint::resume),
            config_hash: self.config_hash.clone(),
        }
    }
}

/// The phase as `coordinator status` shows it.
fn phase_name(phase: WorkerPhase) -> &'static str {
    match phase {
        WorkerPhase::Unspecified => "",
        WorkerPhase::Loading => "loading",
        WorkerPhase::Step => "step",
        WorkerPhase::AllReduce => "all-reduce",
        WorkerPhase::Checkpoint => "checkpoint",
        WorkerPhase::Eval => "eval",
        WorkerPhase::Waiting => "waiting",
    }
}

#[cfg(test)]
mod tests;
