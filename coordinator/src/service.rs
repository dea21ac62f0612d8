//! The gRPC face of the coordinator: checks the token, then delegates to [`JobState`]. Request
//! sizes are bounded before a request reaches it (`limits`).
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mtl_proto::v1::coordinator_server::Coordinator;
use mtl_proto::v1::{
    CheckpointAck, CheckpointCommit, HeartbeatRequest, HeartbeatResponse, JobStatus, LeaveRequest,
    LeaveResponse, MetricsAck, MetricsReport, RegisterRequest, RegisterResponse, ShardRequest, ShardResponse,
    StatusRequest,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::limits;
use crate::state::{Held, JobState, Progress, Registered, WorkerInfo};
use crate::CoordinatorError;

/// Shared handle on the job: the state plus a signal that fires on every phase change.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) state: Arc<Mutex<JobState>>,
    pub(crate) changed_tx: Arc<watch::Sender<()>>,
    pub(crate) rendezvous_timeout: Duration,
    pub(crate) min_workers: u32,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().expect("job state lock poisoned")
    }

    fn notify(&self) {
        self.changed_tx.send_replace(());
    }
}

pub(crate) struct CoordinatorService {
    pub(crate) shared: Shared,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[tracing::instrument(skip_all, fields(worker_id = %request.get_ref().worker_id))]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let req = request.into_inner();
        let shared = &self.shared;
        let mut changed_rx = shared.changed_tx.subscribe();
        let mut admission = false;
        {
            let mut state = shared.lock();
            state.check_token(&req.job_token)?;
            let info = WorkerInfo {
                worker_id: req.worker_id.clone(),
                host: req.host,
                device: req.device,
                peer_addr: req.peer_addr,
                nccl_unique_id: req.nccl_unique_id,
            };
            let held = req.holds_state.then(|| Held {
                step: req.step,
                epoch: req.epoch,
                epoch_position: req.epoch_position,
                generation: req.left_generation,
                left_reason: req.left_reason.clone(),
            });
            match state.register_with(info, req.generation, req.step, held, Instant::now())? {
                Registered::Reattached => {
                    let mut placement = state.placement(&req.worker_id).ok_or_else(|| {
                        Status::internal(format!(
                            "worker `{}` re-attached without a placement",
                            req.worker_id
                        ))
                    })?;
                    placement.reattached = true;
                    return Ok(Response::new(placement));
                }
                Registered::Formed => {
                    drop(state);
                    shared.notify();
                }
                Registered::LastCall(deadline) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(deadline.into()).await;
                        match shared.lock().close_rendezvous(Instant::now()) {
                            Ok(true) => shared.notify(),
                            Ok(false) => {}
                            Err(err) => tracing::error!(%err, "cannot form the generation"),
                        }
                    });
                }
                Registered::Waiting => {}
                Registered::AwaitingAdmission => admission = true,
            }
        }
        let wait = async {
            loop {
                {
                    let state = shared.lock();
                    if let Some(placement) = state.placement(&req.worker_id) {
                        return Ok(placement);
                    }
                    state.ensure_open()?;
                }
                if changed_rx.changed().await.is_err() {
                    // The job ended meanwhile (say so: the worker stops at once rather than
                    // retrying a coordinator that is going away), or the server is stopping.
                    shared.lock().ensure_open()?;
                    return Err(Status::unavailable("coordinator is shutting down"));
                }
            }
        };
        if admission {
            // A newcomer waits for the running generation's next admission point, which may be
            // an epoch away: only the job's end stops the wait.
            return Ok(Response::new(wait.await?));
        }
        match tokio::time::timeout(shared.rendezvous_timeout, wait).await {
            Ok(placement) => Ok(Response::new(placement?)),
            Err(_) => {
                let mut state = shared.lock();
                let registered = state.pending_count();
                state.withdraw(&req.worker_id);
                Err(CoordinatorError::RendezvousTimeout {
                    timeout_ms: shared.rendezvous_timeout.as_millis() as u64,
                    registered,
                    min_workers: shared.min_workers,
                }
                .into())
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let mut state = self.shared.lock();
        state.check_token(&req.job_token)?;
        let progress = Progress { step: req.step, phase: req.phase(), collective_seq: req.collective_seq };
        let (directive, reason) =
            state.heartbeat(&req.worker_id, req.generation, progress, Instant::now())?;
        Ok(Response::new(HeartbeatResponse { directive: directive as i32, reason }))
    }

    #[tracing::instrument(skip_all, fields(worker_id = %request.get_ref().worker_id, epoch = request.get_ref().epoch))]
    async fn get_shard(&self, request: Request<ShardRequest>) -> Result<Response<ShardResponse>, Status> {
        let req = request.into_inner();
        let mut state = self.shared.lock();
        state.check_token(&req.job_token)?;
        Ok(Response::new(state.shard(&req, Instant::now())?))
    }

    #[tracing::instrument(skip_all, fields(worker_id = %request.get_ref().worker_id, step = request.get_ref().step))]
    async fn report_metrics(&self, request: Request<MetricsReport>) -> Result<Response<MetricsAck>, Status> {
        limits::check("ReportMetrics", request.get_ref(), limits::metrics_bytes(request.get_ref()))?;
        let req = request.into_inner();
        let mut state = self.shared.lock();
        state.check_token(&req.job_token)?;
        state.report_metrics(req, Instant::now())?;
        Ok(Response::new(MetricsAck {}))
    }

    #[tracing::instrument(skip_all, fields(worker_id = %request.get_ref().worker_id, step = request.get_ref().step))]
    async fn commit_checkpoint(
        &self,
        request: Request<CheckpointCommit>,
    ) -> Result<Response<CheckpointAck>, Status> {
        let req = request.into_inner();
        let mut state = self.shared.lock();
        state.check_token(&req.job_token)?;
        Ok(Response::new(state.commit_checkpoint(&req, Instant::now())?))
    }

    #[tracing::instrument(skip_all, fields(worker_id = %request.get_ref().worker_id, failed = request.get_ref().failed))]
    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let req = request.into_inner();
        {
            let mut state = self.shared.lock();
            state.check_token(&req.job_token)?;
            state.leave(&req.worker_id, req.generation, req.failed, req.interrupted, &req.message)?;
        }
        self.shared.notify();
        Ok(Response::new(LeaveResponse {}))
    }

    async fn get_status(&self, request: Request<StatusRequest>) -> Result<Response<JobStatus>, Status> {
        let state = self.shared.lock();
        state.check_token(&request.get_ref().job_token)?;
        Ok(Response::new(state.status(Instant::now())))
    }
}
