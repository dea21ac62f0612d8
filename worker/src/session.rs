//! A worker's membership in a job: registration, heartbeats, shard requests, metric reports,
//! checkpoint commits, regrouping, leaving.
//!
//! The coordinator may go away for a while (restarted, or unreachable): every RPC retries
//! with backoff for up to `rendezvous.coordinator_grace_ms`, reports are buffered meanwhile
//! (training goes on with the shard it holds) and sent in order once it answers again, and
//! the heartbeat task re-attaches with `Register{generation}` (docs/DURABILITY.md).
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mtl_job::JobConfig;
use mtl_proto::client::ClientTls;
use mtl_proto::v1::coordinator_client::CoordinatorClient;
use mtl_proto::v1::{
    CheckpointCommit, Directive, HeartbeatRequest, LeaveRequest, MetricsKind, MetricsReport, RegisterRequest,
    RegisterResponse, ShardRequest, ShardResponse, Split, WorkerPhase,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::stop::StopRequest;
use crate::WorkerError;

/// Who this worker is, as told to the coordinator.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Stable id; ranks are ordered by it.
    pub worker_id: String,
    /// Host name for status output.
    pub host: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Where peers reach this worker (empty when not listening).
    pub peer_addr: String,
    /// An NCCL unique id for when this worker becomes rank 0 (empty on CPU).
    pub nccl_unique_id: Vec<u8>,
}

/// What the coordinator's heartbeat answer asked for: stop, or regroup into the next generation.
#[derive(Debug, Clone)]
struct Halt {
    reason: String,
    regroup: bool,
}

/// What a survivor of an ended generation holds in memory when it registers again.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held {
    /// Optimizer steps completed.
    pub step: u64,
    /// The next sample to train: `epoch_position` of `epoch`.
    pub epoch: u64,
    /// Samples of `epoch` already trained.
    pub epoch_position: u64,
    /// The generation it trained in.
    pub generation: u64,
    /// Why it left (its collective's error, or the coordinator's reason).
    pub reason: String,
}

/// What the heartbeats tell the coordinator about this worker's progress.
#[derive(Debug, Default)]
struct Progress {
    /// The last completed optimizer step.
    step: AtomicU64,
    /// A [`WorkerPhase`] as its wire value.
    phase: AtomicI32,
    /// The collective the worker is in or last finished, counted from 1 in this generation
    /// (every all-reduce and broadcast, SyncBatchNorm's included).
    collective_seq: AtomicU64,
}

/// The longest wait between two tries of an RPC while the coordinator is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Counts a generation's collectives into the heartbeat's progress.
#[derive(Debug, Clone)]
pub(crate) struct Tracer {
    progress: Arc<Progress>,
}

impl Tracer {
    /// Entering a collective: phase `all-reduce`, the next sequence number. Returns the phase
    /// to go back to.
    pub(crate) fn enter(&self) -> i32 {
        self.progress.collective_seq.fetch_add(1, Ordering::Relaxed);
        self.progress.phase.swap(WorkerPhase::AllReduce as i32, Ordering::Relaxed)
    }

    /// Left the collective: back to `phase`.
    pub(crate) fn leave(&self, phase: i32) {
        self.progress.phase.store(phase, Ordering::Relaxed);
    }
}

/// What a worker tells the coordinator without waiting for an answer it needs to train on.
#[derive(Debug, Clone)]
enum Outgoing {
    Report(MetricsReport),
    Commit(CheckpointCommit),
}

/// A registered worker: its place in the generation and the job config it was handed.
pub(crate) struct Session {
    client: CoordinatorClient<Channel>,
    token: String,
    identity: Identity,
    /// The placement the coordinator returned.
    pub placement: RegisterResponse,
    /// The job, as owned by the coordinator.
    pub config: JobConfig,
    progress: Arc<Progress>,
    stop_rx: watch::Receiver<Option<Halt>>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// `rendezvous.coordinator_grace_ms`: how long an unreachable coordinator is retried.
    grace: Duration,
    /// Reports and commits the coordinator has not accepted yet (it was unreachable), oldest
    /// first.
    pending: VecDeque<Outgoing>,
    /// Since when reports have been failing to go through.
    unreachable_since: Option<Instant>,
    /// Set by a signal or by the coordinator's `DIRECTIVE_INTERRUPT`.
    stop: StopRequest,
}

impl Session {
    /// The key ring peers prove their membership in this job with.
    pub(crate) fn ring_key(&self) -> crate::collective::ring::RingKey {
        crate::collective::ring::RingKey::from_token(&self.token)
    }

    /// Connects, registers and waits for the generation to form.
    pub(crate) async fn join(
        addr: &str,
        tls: &ClientTls,
        token: &str,
        identity: Identity,
        stop: StopRequest,
    ) -> Result<Self, WorkerError> {
        let client = mtl_proto::client::connect(addr, tls)
            .await
            .map_err(|message| WorkerError::Connect { addr: addr.to_string(), message })?;
        Self::enter(client, token, identity, None, Duration::ZERO, stop).await
    }

    /// Leaves the ended generation and registers for the next one with the state this worker
    /// holds; waits for the generation to form. On an error the session stays as it was.
    pub(crate) async fn rejoin(&mut self, held: &Held) -> Result<(), WorkerError> {
        self.heartbeat.abort();
        let next = Self::enter(
            self.client.clone(),
            &self.token,
            self.identity.clone(),
            Some(held),
            self.grace,
            self.stop.clone(),
        )
        .await?;
        // Reports and commits of the ended generation still go to the coordinator, in order.
        let pending = std::mem::take(&mut self.pending);
        *self = next;
        self.pending = pending;
        self.flush(false).await
    }

    /// Registers (as a survivor when `held` is given), retrying an unreachable coordinator for
    /// up to `retry_for`, and starts heartbeating.
    async fn enter(
        mut client: CoordinatorClient<Channel>,
        token: &str,
        identity: Identity,
        held: Option<&Held>,
        retry_for: Duration,
        stop: StopRequest,
    ) -> Result<Self, WorkerError> {
        let h = held.cloned().unwrap_or_default();
        let register = RegisterRequest {
            job_token: token.to_string(),
            worker_id: identity.worker_id.clone(),
            host: identity.host.clone(),
            device: identity.device.clone(),
            peer_addr: identity.peer_addr.clone(),
            nccl_unique_id: identity.nccl_unique_id.clone(),
            generation: 0,
            step: h.step,
            holds_state: held.is_some(),
            epoch: h.epoch,
            epoch_position: h.epoch_position,
            left_generation: h.generation,
            left_reason: h.reason,
        };
        let deadline = Instant::now() + retry_for;
        let mut backoff = Duration::from_millis(50);
        let placement = loop {
            match client.register(register.clone()).await {
                Ok(reply) => break reply.into_inner(),
                Err(status) if transient(&status) && Instant::now() + backoff < deadline => {
                    tracing::warn!(%status, retry_in_ms = backoff.as_millis() as u64, "coordinator unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(status) => return Err(WorkerError::Rpc { rpc: "Register", status }),
            }
        };
        let config = match JobConfig::from_toml(&placement.job_config_toml) {
            Ok(config) => config,
            Err(err) => {
                // Registered already: tell the coordinator, so the job fails now rather than at
                // the heartbeat timeout (typically a worker older than the coordinator).
                let message = format!("cannot use the coordinator's job config: {err}");
                let request = leave_request(token, &identity, placement.generation, Some(&message));
                let _ = client.leave(request).await;
                return Err(err.into());
            }
        };
        tracing::info!(
            rank = placement.rank,
            world_size = placement.world_size,
            generation = placement.generation,
            job = %config.job.name,
            "joined"
        );
        let progress = Arc::new(Progress::default());
        progress.step.store(h.step, Ordering::Relaxed);
        progress.phase.store(WorkerPhase::Loading as i32, Ordering::Relaxed);
        let (stop_tx, stop_rx) = watch::channel(None);
        let grace = Duration::from_millis(config.rendezvous.coordinator_grace_ms);
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            HeartbeatRequest {
                job_token: token.to_string(),
                worker_id: identity.worker_id.clone(),
                generation: placement.generation,
                step: h.step,
                ..Default::default()
            },
            // A re-attach names the generation and holds no state to hand over.
            RegisterRequest { generation: placement.generation, holds_state: false, ..register },
            Duration::from_millis(u64::from(placement.heartbeat_interval_ms.max(1))),
            grace,
            progress.clone(),
            Stops { halt_tx: stop_tx, stop: stop.clone() },
        ));
        Ok(Self {
            client,
            token: token.to_string(),
            identity,
            placement,
            config,
            progress,
            stop_rx,
            heartbeat,
            grace,
            pending: VecDeque::new(),
            unreachable_since: None,
            stop,
        })
    }

    /// The stop request the trainer contributes to every step.
    pub(crate) fn stop(&self) -> StopRequest {
        self.stop.clone()
    }

    /// Records training progress (sent with the next heartbeat).
    pub(crate) fn set_step(&self, step: u64) {
        self.progress.step.store(step, Ordering::Relaxed);
    }

    /// Records what the worker is doing now (sent with the next heartbeat).
    pub(crate) fn set_phase(&self, phase: WorkerPhase) {
        self.progress.phase.store(phase as i32, Ordering::Relaxed);
    }

    /// Records the collectives of this generation (for [`crate::collective::Traced`]).
    pub(crate) fn tracer(&self) -> Tracer {
        Tracer { progress: self.progress.clone() }
    }

    /// Errors if the coordinator has told this worker to stop.
    pub(crate) fn check_stop(&self) -> Result<(), WorkerError> {
        match self.stop_rx.borrow().as_ref() {
            Some(Halt { reason, regroup: true }) => Err(WorkerError::GenerationEnded {
                generation: self.placement.generation,
                reason: reason.clone(),
            }),
            Some(Halt { reason, .. }) => Err(WorkerError::Stopped { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// Sends named scalars (losses, learning rate, ...) or evaluation statistics for one step.
    /// While the coordinator is unreachable the report is kept, in order with the others, and
    /// sent with the next one that goes through; an error only once that has lasted longer
    /// than `rendezvous.coordinator_grace_ms`, or when the coordinator refuses it.
    pub(crate) async fn report(
        &mut self,
        kind: MetricsKind,
        step: u64,
        epoch: u64,
        scalars: HashMap<String, f64>,
        eval_stats_json: Vec<u8>,
    ) -> Result<(), WorkerError> {
        self.pending.push_back(Outgoing::Report(MetricsReport {
            job_token: self.token.clone(),
            worker_id: self.identity.worker_id.clone(),
            generation: self.placement.generation,
            rank: self.placement.rank,
            kind: kind as i32,
            step,
            epoch,
            scalars,
            eval_stats_json,
        }));
        self.flush(false).await
    }

    /// Sends the buffered reports and commits in order. With `wait`, retries each until the
    /// grace period ends; without, stops at the first the coordinator cannot take now and
    /// keeps the rest.
    async fn flush(&mut self, wait: bool) -> Result<(), WorkerError> {
        while let Some(outgoing) = self.pending.front().cloned() {
            let rpc = match outgoing {
                Outgoing::Report(_) => "ReportMetrics",
                Outgoing::Commit(_) => "CommitCheckpoint",
            };
            let send = |mut c: CoordinatorClient<Channel>| {
                let outgoing = outgoing.clone();
                async move {
                    match outgoing {
                        Outgoing::Report(r) => c.report_metrics(r).await.map(|_| tonic::Response::new(None)),
                        Outgoing::Commit(r) => {
                            c.commit_checkpoint(r).await.map(|a| tonic::Response::new(Some(a.into_inner())))
                        }
                    }
                }
            };
            let result = if wait {
                self.call(rpc, send).await
            } else {
                let generation = self.placement.generation;
                send(self.client.clone())
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| self.error(rpc, generation, status))
            };
            match result {
                Ok(ack) => {
                    self.pending.pop_front();
                    self.unreachable_since = None;
                    if let (Outgoing::Commit(c), Some(ack)) = (&outgoing, ack) {
                        tracing::info!(path = %c.path, step = c.step, pruned = ?ack.pruned, "checkpoint committed");
                    }
                }
                Err(WorkerError::Rpc { status, .. }) if !wait && transient(&status) => {
                    let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.grace {
                        return Err(WorkerError::Rpc { rpc, status });
                    }
                    tracing::warn!(buffered = self.pending.len(), %status, "coordinator unreachable; kept for later");
                    return Ok(());
                }
                // The generation it belongs to ended before the coordinator took it: a report
                // or commit the job can do without (the next checkpoint supersedes it).
                Err(err) if outgoing_generation(&outgoing) < self.placement.generation => {
                    tracing::warn!(rpc, %err, "dropped what an ended generation could not send");
                    self.pending.pop_front();
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// This rank's share of one epoch of `split`, telling the coordinator what data it sees.
    /// For the train split, `epoch_position` is given when this worker continues an epoch it
    /// did not start in this generation (samples of it its state has trained).
    pub(crate) async fn shard(
        &mut self,
        split: Split,
        epoch: u64,
        epoch_position: Option<u64>,
        dataset_samples: u64,
        dataset_fingerprint: String,
    ) -> Result<ShardResponse, WorkerError> {
        let request = ShardRequest {
            job_token: self.token.clone(),
            worker_id: self.identity.worker_id.clone(),
            generation: self.placement.generation,
            split: split as i32,
            epoch,
            dataset_samples,
            dataset_fingerprint,
            steps_done: self.progress.step.load(Ordering::Relaxed),
            epoch_position,
        };
        self.call("GetShard", |mut c| {
            let request = request.clone();
            async move { c.get_shard(request).await }
        })
        .await
    }

    /// Commits the checkpoint directory `path` (relative to `checkpoint.dir`) taken after
    /// `step`, training continuing at sample `epoch_position` of `epoch`. In order with the
    /// reports (so the coordinator records the checkpoint with the metrics up to its step) and
    /// buffered like them while the coordinator is unreachable: training goes on meanwhile.
    pub(crate) async fn commit(
        &mut self,
        path: String,
        step: u64,
        epoch: u64,
        epoch_position: u64,
        stopping: bool,
    ) -> Result<(), WorkerError> {
        self.pending.push_back(Outgoing::Commit(CheckpointCommit {
            job_token: self.token.clone(),
            worker_id: self.identity.worker_id.clone(),
            generation: self.placement.generation,
            step,
            epoch,
            epoch_position,
            path,
            config_hash: self.placement.config_hash.clone(),
            stopping,
        }));
        self.flush(false).await
    }

    /// Sends the buffered reports, tells the coordinator this worker is done (or failed) and
    /// stops heartbeating.
    pub(crate) async fn leave(self, failure: Option<&str>) -> Result<(), WorkerError> {
        let request = leave_request(&self.token, &self.identity, self.placement.generation, failure);
        self.leave_with(request).await
    }

    /// Leaves after a stop on request at `step`, once the final checkpoint's commit went
    /// through: the coordinator records the job as interrupted, not finished.
    pub(crate) async fn leave_interrupted(self, step: u64) -> Result<(), WorkerError> {
        let mut request = leave_request(&self.token, &self.identity, self.placement.generation, None);
        request.interrupted = true;
        request.step = step;
        self.leave_with(request).await
    }

    async fn leave_with(mut self, request: LeaveRequest) -> Result<(), WorkerError> {
        let flushed = self.flush(true).await;
        self.heartbeat.abort();
        self.call("Leave", |mut c| {
            let request = request.clone();
            async move { c.leave(request).await }
        })
        .await?;
        flushed
    }

    /// Calls `rpc` through `f`, retrying with backoff while the coordinator is unreachable,
    /// for up to the grace period.
    async fn call<T, F, Fut>(&self, rpc: &'static str, mut f: F) -> Result<T, WorkerError>
    where
        F: FnMut(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.grace;
        let mut backoff = Duration::from_millis(50);
        loop {
            match f(self.client.clone()).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) if transient(&status) && Instant::now() + backoff < deadline => {
                    tracing::warn!(rpc, %status, retry_in_ms = backoff.as_millis() as u64, "coordinator unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(status) => return Err(self.error(rpc, self.placement.generation, status)),
            }
        }
    }

    /// The error for the coordinator's answer `status` to `rpc`: `ABORTED` means the
    /// generation ended and this worker regroups into the next one.
    fn error(&self, rpc: &'static str, generation: u64, status: Status) -> WorkerError {
        if status.code() == Code::Aborted {
            WorkerError::GenerationEnded { generation, reason: status.message().to_string() }
        } else {
            WorkerError::Rpc { rpc, status }
        }
    }
}

fn outgoing_generation(outgoing: &Outgoing) -> u64 {
    match outgoing {
        Outgoing::Report(r) => r.generation,
        Outgoing::Commit(c) => c.generation,
    }
}

/// Whether `status` says the coordinator could not be reached (rather than that it refused).
fn transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
}

/// The longest failure message a `Leave` carries, well under the coordinator's 64 KiB bound
/// on that RPC, so that a long error still reaches it (cut) instead of being refused.
const LEAVE_MESSAGE_BYTES: usize = 16 << 10;

/// A `Leave` for this worker: done (`failure` None) or failed with that message.
fn leave_request(token: &str, identity: &Identity, generation: u64, failure: Option<&str>) -> LeaveRequest {
    LeaveRequest {
        job_token: token.to_string(),
        worker_id: identity.worker_id.clone(),
        generation,
        failed: failure.is_some(),
        message: cut(failure.unwrap_or_default(), LEAVE_MESSAGE_BYTES),
        ..Default::default()
    }
}

/// `message` cut to at most `max` bytes at a character boundary, saying so.
fn cut(message: &str, max: usize) -> String {
    const MARK: &str = " ... (cut)";
    if message.len() <= max {
        return message.to_string();
    }
    let mut end = max.saturating_sub(MARK.len());
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &message[..end])
}

/// How the heartbeat task stops the worker: at once (`halt_tx`: stop or regroup), or after
/// the current step with a checkpoint (`stop`, on `DIRECTIVE_INTERRUPT`).
struct Stops {
    halt_tx: watch::Sender<Option<Halt>>,
    stop: StopRequest,
}

/// Sends heartbeats with the worker's progress; stops the worker when the coordinator says
/// so (or to regroup), or when no heartbeat has gone through for `grace` (the coordinator is
/// gone: training on would be lost work). After heartbeats failed, the first thing sent to the
/// coordinator is `reattach` (a `Register` naming this generation): a restarted coordinator
/// takes the worker back, or says the generation is over, and the worker regroups.
async fn heartbeat_loop(
    mut client: CoordinatorClient<Channel>,
    mut request: HeartbeatRequest,
    mut reattach: RegisterRequest,
    interval: Duration,
    grace: Duration,
    progress: Arc<Progress>,
    stops: Stops,
) {
    let Stops { halt_tx: stop_tx, stop } = stops;
    let mut tick = tokio::time::interval(interval);
    let mut last_ok = Instant::now();
    let mut lost = false;
    let rpc_timeout = interval.max(Duration::from_millis(100)) * 4;
    loop {
        tick.tick().await;
        request.step = progress.step.load(Ordering::Relaxed);
        request.phase = progress.phase.load(Ordering::Relaxed);
        request.collective_seq = progress.collective_seq.load(Ordering::Relaxed);
        if lost {
            reattach.step = request.step;
            match tokio::time::timeout(rpc_timeout, client.register(reattach.clone())).await {
                Ok(Ok(_)) => {
                    tracing::info!(generation = reattach.generation, step = reattach.step, "re-attached");
                    lost = false;
                }
                Ok(Err(status)) if !transient(&status) => {
                    // The generation ended while the coordinator was away: regroup with the state.
                    let reason = format!(
                        "could not re-attach to generation {}: {}",
                        reattach.generation,
                        status.message()
                    );
                    tracing::warn!(%reason, "regrouping");
                    stop_tx.send_replace(Some(Halt { reason, regroup: true }));
                    return;
                }
                // Said once per outage; the heartbeat's own warning opened it.
                Ok(Err(status)) => tracing::debug!(%status, "re-attach failed"),
                Err(_) => tracing::debug!("re-attach timed out"),
            }
        }
        if !lost {
            match tokio::time::timeout(rpc_timeout, client.heartbeat(request.clone())).await {
                Ok(Ok(reply)) => {
                    last_ok = Instant::now();
                    let reply = reply.into_inner();
                    if reply.directive == Directive::Interrupt as i32 && !stop.request() {
                        tracing::warn!(reason = %reply.reason, "coordinator asks to stop after this step with a checkpoint");
                    }
                    let regroup = reply.directive == Directive::Regroup as i32;
                    if regroup || reply.directive == Directive::Stop as i32 {
                        tracing::warn!(reason = %reply.reason, regroup, "coordinator says stop");
                        stop_tx.send_replace(Some(Halt { reason: reply.reason, regroup }));
                        return;
                    }
                }
                Ok(Err(status)) if status.code() == Code::Aborted => {
                    tracing::warn!(reason = %status.message(), "the generation ended; regrouping");
                    stop_tx.send_replace(Some(Halt { reason: status.message().to_string(), regroup: true }));
                    return;
                }
                Ok(Err(status)) => {
                    // Unreachable, or restarted without this generation: re-attaching tells which.
                    tracing::warn!(%status, "heartbeat failed");
                    lost = true;
                }
                Err(_) => {
                    tracing::warn!("heartbeat timed out");
                    lost = true;
                }
            }
        }
        if last_ok.elapsed() > grace {
            let reason = format!(
                "the coordinator did not answer heartbeats for {} ms (rendezvous.coordinator_grace_ms)",
                grace.as_millis()
            );
            tracing::error!(%reason, "giving up");
            stop_tx.send_replace(Some(Halt { reason, regroup: false }));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_failure_messages_are_cut_at_a_character_boundary() {
        assert_eq!(super::cut("short", 16), "short");
        let cut = super::cut(&"é".repeat(100), 31);
        assert!(cut.len() <= 31 && cut.ends_with(" ... (cut)"), "{cut}");
        assert!(cut.starts_with("éééé"));
    }
}
