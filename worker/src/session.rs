//! A worker's membership in a job: registration, heartbeats, metric reports, leaving.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mtl_job::JobConfig;
use mtl_proto::v1::coordinator_client::CoordinatorClient;
use mtl_proto::v1::{
    Directive, HeartbeatRequest, LeaveRequest, MetricsKind, MetricsReport, RegisterRequest, RegisterResponse,
    ShardRequest, ShardResponse, Split,
};
use tokio::sync::watch;
use tonic::transport::Channel;

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

/// A registered worker: its place in the generation and the job config it was handed.
pub(crate) struct Session {
    client: CoordinatorClient<Channel>,
    token: String,
    identity: Identity,
    /// The placement the coordinator returned.
    pub placement: RegisterResponse,
    /// The job, as owned by the coordinator.
    pub config: JobConfig,
    step: Arc<AtomicU64>,
    stop_rx: watch::Receiver<Option<Halt>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Connects, registers and waits for the generation to form.
    pub(crate) async fn join(addr: &str, token: &str, identity: Identity) -> Result<Self, WorkerError> {
        let client = CoordinatorClient::connect(addr.to_string())
            .await
            .map_err(|source| WorkerError::Connect { addr: addr.to_string(), source })?
            .max_encoding_message_size(mtl_proto::MAX_MESSAGE_BYTES)
            .max_decoding_message_size(mtl_proto::MAX_MESSAGE_BYTES);
        Self::enter(client, token, identity, None).await
    }

    /// Leaves the ended generation and registers for the next one with the state this worker
    /// holds; waits for the generation to form. On an error the session stays as it was.
    pub(crate) async fn rejoin(&mut self, held: &Held) -> Result<(), WorkerError> {
        self.heartbeat.abort();
        *self = Self::enter(self.client.clone(), &self.token, self.identity.clone(), Some(held)).await?;
        Ok(())
    }

    /// Registers (as a survivor when `held` is given) and starts heartbeating.
    async fn enter(
        mut client: CoordinatorClient<Channel>,
        token: &str,
        identity: Identity,
        held: Option<&Held>,
    ) -> Result<Self, WorkerError> {
        let h = held.cloned().unwrap_or_default();
        let placement = client
            .register(RegisterRequest {
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
            })
            .await
            .map_err(WorkerError::rpc("Register"))?
            .into_inner();
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
        let step = Arc::new(AtomicU64::new(held.map_or(0, |h| h.step)));
        let (stop_tx, stop_rx) = watch::channel(None);
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            HeartbeatRequest {
                job_token: token.to_string(),
                worker_id: identity.worker_id.clone(),
                generation: placement.generation,
                step: held.map_or(0, |h| h.step),
                ..Default::default()
            },
            Duration::from_millis(u64::from(placement.heartbeat_interval_ms.max(1))),
            Duration::from_millis(config.rendezvous.heartbeat_timeout_ms),
            step.clone(),
            stop_tx,
        ));
        Ok(Self { client, token: token.to_string(), identity, placement, config, step, stop_rx, heartbeat })
    }

    /// Records training progress (sent with the next heartbeat).
    pub(crate) fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
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

    /// Sends named scalars (losses, learning rate, ...) for one step.
    pub(crate) async fn report(
        &mut self,
        kind: MetricsKind,
        step: u64,
        epoch: u64,
        scalars: HashMap<String, f64>,
        eval_stats_json: Vec<u8>,
    ) -> Result<(), WorkerError> {
        self.client
            .report_metrics(MetricsReport {
                job_token: self.token.clone(),
                worker_id: self.identity.worker_id.clone(),
                generation: self.placement.generation,
                rank: self.placement.rank,
                kind: kind as i32,
                step,
                epoch,
                scalars,
                eval_stats_json,
            })
            .await
            .map_err(WorkerError::rpc("ReportMetrics"))?;
        Ok(())
    }

    /// This rank's share of one epoch of `split`, telling the coordinator what data it sees.
    pub(crate) async fn shard(
        &mut self,
        split: Split,
        epoch: u64,
        dataset_samples: u64,
        dataset_fingerprint: String,
    ) -> Result<ShardResponse, WorkerError> {
        self.shard_at(split, epoch, dataset_samples, dataset_fingerprint, None).await
    }

    /// [`Session::shard`] continuing `epoch` from `epoch_position` (samples this worker's state
    /// has trained), as a generation that did not start the epoch does.
    pub(crate) async fn shard_at(
        &mut self,
        split: Split,
        epoch: u64,
        dataset_samples: u64,
        dataset_fingerprint: String,
        epoch_position: Option<u64>,
    ) -> Result<ShardResponse, WorkerError> {
        Ok(self
            .client
            .get_shard(ShardRequest {
                job_token: self.token.clone(),
                worker_id: self.identity.worker_id.clone(),
                generation: self.placement.generation,
                split: split as i32,
                epoch,
                dataset_samples,
                dataset_fingerprint,
                steps_done: self.step.load(Ordering::Relaxed),
                epoch_position,
            })
            .await
            .map_err(WorkerError::rpc("GetShard"))?
            .into_inner())
    }

    /// Tells the coordinator this worker is done (or failed) and stops heartbeating.
    pub(crate) async fn leave(mut self, failure: Option<&str>) -> Result<(), WorkerError> {
        self.heartbeat.abort();
        let request = leave_request(&self.token, &self.identity, self.placement.generation, failure);
        self.client.leave(request).await.map_err(WorkerError::rpc("Leave"))?;
        Ok(())
    }
}

/// A `Leave` for this worker: done (`failure` None) or failed with that message.
fn leave_request(token: &str, identity: &Identity, generation: u64, failure: Option<&str>) -> LeaveRequest {
    LeaveRequest {
        job_token: token.to_string(),
        worker_id: identity.worker_id.clone(),
        generation,
        failed: failure.is_some(),
        message: failure.unwrap_or_default().to_string(),
    }
}

/// Sends heartbeats; stops the worker when the coordinator says so, or when no heartbeat has
/// gone through for `timeout` (the coordinator is gone: training on would be lost work).
async fn heartbeat_loop(
    mut client: CoordinatorClient<Channel>,
    mut request: HeartbeatRequest,
    interval: Duration,
    timeout: Duration,
    step: Arc<AtomicU64>,
    stop_tx: watch::Sender<Option<Halt>>,
) {
    let mut tick = tokio::time::interval(interval);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        request.step = step.load(Ordering::Relaxed);
        match tokio::time::timeout(
            interval.max(Duration::from_millis(100)) * 4,
            client.heartbeat(request.clone()),
        )
        .await
        {
            Ok(Ok(reply)) => {
                last_ok = tokio::time::Instant::now();
                let reply = reply.into_inner();
                let regroup = reply.directive == Directive::Regroup as i32;
                if regroup || reply.directive == Directive::Stop as i32 {
                    tracing::warn!(reason = %reply.reason, regroup, "coordinator says stop");
                    stop_tx.send_replace(Some(Halt { reason: reply.reason, regroup }));
                    return;
                }
            }
            Ok(Err(status)) => tracing::warn!(%status, "heartbeat failed"),
            Err(_) => tracing::warn!("heartbeat timed out"),
        }
        if last_ok.elapsed() > timeout {
            let reason = format!("the coordinator did not answer heartbeats for {} ms", timeout.as_millis());
            tracing::error!(%reason, "giving up");
            stop_tx.send_replace(Some(Halt { reason, regroup: false }));
            return;
        }
    }
}
