//! The job's state machine: rendezvous into generations, re-attach after a restart, liveness,
//! sample accounting, checkpoint commits, completion. Pure logic behind a mutex; the gRPC
//! service only translates requests into these calls, and time is passed in (`now`) so
//! liveness is testable without sleeping. Every durable change goes to the [`Store`] as it
//! happens, and [`JobState::new`] reloads it. Submodules: `restore` (after a restart),
//! `shards` (sharding and epoch accounting), `reports` (metrics and checkpoint commits),
//! `view` (status), `regroup` (a generation that ends on a lost worker or a failed collective
//! and continues from a survivor's memory), `admission` (newcomers up to `max_workers`, admitted
//! through a regroup).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mtl_job::JobConfig;
use mtl_proto::v1::{Directive, JobEvent, Peer, RegisterResponse, StateRoot, WorkerPhase};

use crate::accounting::Accounting;
use crate::checkpoints::Checkpoint;
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
    /// A newcomer waits for the running generation's next admission point (see `admission`):
    /// it waits without the rendezvous timeout, for as long as that takes.
    AwaitingAdmission,
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
    /// Left after a stop on request, the checkpoint of its last step committed.
    Interrupted,
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
    /// The survivor whose memory it continues from (then `resume` is `None`).
    root: Option<StateRoot>,
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
    /// Whether the job goes on after `ended`: its members are told to regroup, not to stop.
    ended_regroup: bool,
    /// Survivors waiting in the rendezvous with their training state in memory.
    held: BTreeMap<String, regroup::Held>,
    /// After a generation ended on a fault: until when the next one may form before the job fails.
    regroup_deadline: Option<Instant>,
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
    /// The last train permutation computed, by (samples, epoch): every rank's shard of an
    /// epoch is a slice of it.
    permutation: Option<((u64, u64), Vec<u64>)>,
    /// Why the coordinator was asked to stop (see `stop`): the running generation's members are
    /// told `DIRECTIVE_INTERRUPT`.
    stopping: Option<String>,
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
        let history = History::open(
            cfg.server.metrics_path(&cfg.job.name),
            restored.history,
            cfg.server.tensorboard_path(&cfg.job.name).as_deref(),
        )?;
        let mut state = Self {
            config_toml: cfg.to_toml(),
            config_hash,
            checkpoint_dir: cfg.checkpoint.dir_path(&cfg.job.name),
            cfg,
            phase: Phase::Rendezvous,
            pending: BTreeMap::new(),
            generation: None,
            ended: None,
            ended_regroup: false,
            held: BTreeMap::new(),
            regroup_deadline: None,
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
            permutation: None,
            stopping: None,
        };
        if !fresh {
            state.restore(restored.outcome, restored.generations, now)?;
        }
        Ok(state)
    }

    fn log_event(&mut self, generation: u64, kind: &str, detail: String) -> Result<(), CoordinatorError> {
        tracing::info!(generation, kind, %detail, "job event");
        let event = JobEvent { at_unix_ms: unix_ms(), generation, kind: kind.into(), detail };
        self.store.insert_event(&event)?;
        self.push_event(event);
        Ok(())
    }

    /// Keeps a stored event for `Status` and exports it at the step the job is at: the most
    /// advanced member of the running (or just ended) generation, or the step it started from.
    fn push_event(&mut self, event: JobEvent) {
        let g = self.generation.as_ref().or(self.ended.as_ref().map(|(g, _)| g));
        let step = g.map_or(0, |g| {
            let start = g.root.as_ref().map(|r| r.step).or(g.resume.as_ref().map(|c| c.step));
            g.members.iter().map(|m| m.progress.step).chain(start).max().unwrap_or(0)
        });
        let world_size = (event.kind == "formed").then(|| g.map_or(0, |g| g.members.len()));
        self.history.event(step, &event, world_size);
        self.events.push(event);
    }

    /// Writes what the exports still hold; called once the job is over.
    pub(crate) fn close_exports(&mut self) {
        self.history.close();
    }

    fn newest_checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoints.iter().filter(|c| !c.pruned).max_by_key(|c| c.step)
    }

    pub(crate) fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Accepts exactly the job's token (compared in constant time); a job without one, which
    /// [`crate::run`] never serves, accepts nothing.
    pub(crate) fn check_token(&self, token: &str) -> Result<(), CoordinatorError> {
        if self.cfg.job.token.matches(token) {
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
    #[cfg(test)]
    pub(crate) fn register(
        &mut self,
        info: WorkerInfo,
        generation: u64,
        step: u64,
        now: Instant,
    ) -> Result<Registered, CoordinatorError> {
        self.register_with(info, generation, step, None, now)
    }

    /// [`JobState::register`] for a worker that may hold training state in memory (`held`): a
    /// survivor of an ended generation, or a member of the running one whose collective failed
    /// (which ends that generation).
    pub(crate) fn register_with(
        &mut self,
        info: WorkerInfo,
        generation: u64,
        step: u64,
        held: Option<regroup::Held>,
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
        if let Some(why) = &self.stopping {
            return Err(CoordinatorError::Stopping { why: why.clone() });
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
                // Its collective failed: the generation cannot go on, the survivors regroup.
                Some(_) if held.is_some() => {
                    let worker_id = info.worker_id.clone();
                    self.member_left(&worker_id, held.as_ref(), now)?
                }
                Some(_) => return Ok(Registered::Waiting), // a retried registration: the placement stands
                None => return self.request_admission(g.id, g.members.len(), info),
            }
        }
        tracing::info!(worker_id = %info.worker_id, host = %info.host, device = %info.device, "worker registered");
        match held {
            Some(h) => self.held.insert(info.worker_id.clone(), h),
            None => self.held.remove(&info.worker_id),
        };
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
            Some(deadline) if now >= deadline && self.generation.is_none() && self.stopping.is_none() => {
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
        let root = self.state_root(&members)?;
        let resume = if root.is_some() { None } else { self.newest_checkpoint().cloned() };
        let ids: Vec<&str> = members.iter().map(|m| m.info.worker_id.as_str()).collect();
        let mut detail = format!("{} worker(s) in rank order: {}", ids.len(), ids.join(", "));
        match (&root, &resume) {
            (Some(r), _) => {
                detail += &format!(
                    "; continues from the memory of `{}` (step {}, epoch {} at sample {}, generation {})",
                    r.worker_id, r.step, r.epoch, r.epoch_position, r.generation
                )
            }
            (None, Some(c)) => detail += &format!("; resumes from checkpoint step {} ({})", c.step, c.path),
            (None, None) => detail += "; starts afresh",
        }
        if let Some((g, reason)) = &self.ended {
            detail += &format!("; after generation {} ended: {reason}", g.id);
        }
        let event = JobEvent { at_unix_ms: unix_ms(), generation: id, kind: "formed".into(), detail };
        let infos: Vec<WorkerInfo> = members.iter().map(|m| m.info.clone()).collect();
        self.store.insert_generation(id, &infos, &event, resume.as_ref().map(|c| c.step))?;
        tracing::info!(generation = id, world_size = members.len(), detail = %event.detail, "generation formed");
        self.generation = Some(Generation { id, members, resume, root });
        self.push_event(event);
        self.phase = Phase::Running;
        self.last_call = None;
        self.regroup_deadline = None;
        self.held.clear();
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
        self.reattach_deadline = None;
        // Its evaluations can no longer complete: their shares are dropped.
        self.pending_eval.retain(|(generation, _), _| *generation != g.id);
        self.ended = Some((g, reason));
        self.ended_regroup = false;
        self.push_event(event);
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
            state_root: generation.root.clone(),
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
        let rank = self.rank_in(worker_id, generation)?;
        let g = self.generation.as_mut().expect("rank_in found the generation");
        Ok((rank, &mut g.members[rank]))
    }

    /// The rank of `worker_id` in the current generation `generation`. A request of a member
    /// of a generation that ended while the job goes on is answered
    /// [`CoordinatorError::GenerationEnded`] (gRPC `ABORTED`), which tells the worker to
    /// regroup, not to give up, whichever of its requests comes before its heartbeat does.
    fn rank_in(&self, worker_id: &str, generation: u64) -> Result<usize, CoordinatorError> {
        let rank = self.generation.as_ref().filter(|g| g.id == generation).and_then(|g| g.rank_of(worker_id));
        if let Some(rank) = rank {
            return Ok(rank);
        }
        match self.ended_for(worker_id, generation) {
            Some(reason)
                if self.ended_regroup && matches!(self.phase, Phase::Rendezvous | Phase::Running) =>
            {
                Err(CoordinatorError::GenerationEnded {
                    worker_id: worker_id.to_string(),
                    generation,
                    reason: reason.to_string(),
                })
            }
            _ => Err(CoordinatorError::UnknownWorker { worker_id: worker_id.to_string(), generation }),
        }
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
            return Ok(match &self.phase {
                Phase::Failed(failure) => (Directive::Stop, failure.clone()),
                Phase::Finished => (Directive::Stop, "job finished".into()),
                _ if self.ended_regroup => {
                    (Directive::Regroup, format!("generation {generation} ended: {reason}"))
                }
                _ => (Directive::Stop, format!("generation {generation} ended: {reason}")),
            });
        }
        self.touch(worker_id, generation, now, |p| {
            *p = Progress { step: p.step.max(progress.step), ..progress };
        })?;
        Ok(match (&self.phase, &self.stopping) {
            (Phase::Failed(reason), _) => (Directive::Stop, reason.clone()),
            (Phase::Finished, _) => (Directive::Stop, "job finished".into()),
            (_, Some(reason)) => (Directive::Interrupt, reason.clone()),
            _ => (Directive::Continue, String::new()),
        })
    }

    /// Marks members silent for longer than the heartbeat timeout as lost, and members of a
    /// restored generation that did not re-attach within the grace period; either ends the
    /// generation, and its survivors regroup into the next one (see `regroup`). Fails the job
    /// when no generation formed within `rendezvous.timeout_ms` of such an end. Returns the
    /// ids of newly lost workers.
    pub(crate) fn check_liveness(&mut self, now: Instant) -> Result<Vec<String>, CoordinatorError> {
        self.check_regroup_deadline(now)?;
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
                    "worker(s) {} sent no heartbeat for {} ms; generation {id} ended{}",
                    silent.join(", "),
                    timeout.as_millis(),
                    regroup::collective_positions(generation)
                )
            };
            self.end_for_regroup(reason, now)?;
        }
        silent.extend(detached);
        Ok(silent)
    }

    /// A worker is done, failed, or stopped on request (`interrupted`). The job finishes when
    /// every member has left, unless one of them left interrupted: then the generation ends and
    /// the next one resumes from the checkpoint committed before (see `stop`).
    pub(crate) fn leave(
        &mut self,
        worker_id: &str,
        generation: u64,
        failed: bool,
        interrupted: bool,
        message: &str,
    ) -> Result<(), CoordinatorError> {
        let state = match (failed, interrupted) {
            (true, _) => MemberState::Failed,
            (false, true) => MemberState::Interrupted,
            (false, false) => MemberState::Left,
        };
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
        tracing::info!(worker_id, interrupted, "worker left");
        let all_left = self.generation.as_ref().is_some_and(|g| {
            g.members.iter().all(|m| !matches!(m.state, MemberState::Active | MemberState::Detached))
        });
        let any_interrupted = self
            .generation
            .as_ref()
            .is_some_and(|g| g.members.iter().any(|m| m.state == MemberState::Interrupted));
        if all_left && any_interrupted && matches!(self.phase, Phase::Running) {
            return self.end_interrupted();
        }
        if all_left && matches!(self.phase, Phase::Running) {
            self.phase = Phase::Finished;
            tracing::info!(job = %self.cfg.job.name, "job finished");
            self.end_generation("job finished: every worker left".into())?;
            self.store.set_outcome(Some(&StoredOutcome::Finished))?;
        }
        Ok(())
    }
}

mod admission;
mod regroup;
mod stop;
pub(crate) use regroup::Held;
mod reports;
mod restore;
mod shards;
#[cfg(test)]
mod tests;
mod view;
