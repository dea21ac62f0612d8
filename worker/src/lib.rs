//! The worker: the data plane of a training job, one process per GPU (or a CPU worker for
//! development and CI). It joins the coordinator's job ([`session`]), runs LibTorch steps
//! through `tch`, and reports metrics. Layout: `session` (coordinator RPCs and heartbeats),
//! `device` (device selection), `task` (the task vocabulary), `data` (datasets, augmentation,
//! the loader, batches), `model` (backbone, FPN, the multi-task network), `tasks` (heads and
//! their losses), `weighting` (how task losses become one backward), `optim` (optimizers,
//! schedule, clipping), `collective` (ring and NCCL all-reduce), `train` (the step, the epoch
//! loop, evaluation, checkpoints), `predict` (inference to files). The `worker` binary's
//! `commands` module is the only place that prints (its `progress` module draws progress).
#![warn(missing_docs)]

mod collective;
mod data;
mod device;
mod error;
mod kernels;
mod model;
#[cfg(test)]
mod op_count;
mod optim;
mod precision;
mod predict;
mod session;
mod shim;
mod stop;
mod task;
mod tasks;
mod train;
mod weighting;

// The entry points the `worker` binary uses; everything else is the crate's own.
pub use collective::bench::{run as collective_bench, BenchConfig, BenchResult};
pub use data::synthetic::{generate_with as generate_shapes, SyntheticConfig, SyntheticPreset};
pub use device::parse_device;
pub use predict::{run as predict, PredictSummary};
pub use session::Identity;
pub use stop::{stop_on_signals, StopRequest, EXIT_INTERRUPTED};
pub use task::{PerTask, Task, TaskValues};
pub use train::bench_step::{run as bench_step, BenchStepOptions, BenchStepResult};
pub use train::checkpoint::{evaluate as evaluate_checkpoint, open as open_checkpoint, Checkpoint};
pub use train::standalone::{run as train_standalone, Event, Options as StandaloneOptions, Summary};
pub use train::{StepReport, StepValues};

pub(crate) use error::At;
pub use error::WorkerError;

/// Progress of a long command, told after each piece of work: (done, total), in the command's
/// unit (images, steps). The `worker` binary draws it as a progress bar or logs it.
pub type OnProgress<'a> = &'a mut dyn FnMut(u64, u64);

use crate::session::Session;

/// Where `worker run` connects, who it says it is, and where it listens for peers.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The coordinator's URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// How to reach an `https://` coordinator.
    pub tls: mtl_proto::client::ClientTls,
    /// The job token.
    pub token: mtl_job::JobToken,
    /// This worker's identity (its `peer_addr` is filled in from the bound listener).
    pub identity: Identity,
    /// Address to bind for ring traffic (`host:0` picks a free port); its host is advertised.
    pub peer_bind: String,
    /// Rank 0 writes the final checkpoint (a checkpoint directory) here.
    pub out: Option<std::path::PathBuf>,
    /// Set to stop after the current step with a committed checkpoint (see [`stop_on_signals`]);
    /// the coordinator's `DIRECTIVE_INTERRUPT` sets it too.
    pub stop: StopRequest,
}

/// How `worker run` ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The job's last step was trained.
    Finished,
    /// Stopped on request after `step` (0: before training began), every rank at the same
    /// step, the checkpoint of it committed by rank 0: the job resumes from there.
    Interrupted {
        /// The last step trained.
        step: u64,
    },
}

/// Joins the job, trains, reports, leaves. A failure is reported to the coordinator before
/// it is returned, so the job fails fast instead of waiting for a heartbeat timeout.
pub async fn run(mut cfg: RunConfig) -> Result<RunOutcome, WorkerError> {
    let device = device::parse_device(&cfg.identity.device)?;
    // Bound before registering, so the address peers receive is already accepting.
    let listener = std::net::TcpListener::bind(&cfg.peer_bind)
        .map_err(|source| WorkerError::Io { path: cfg.peer_bind.clone().into(), source })?;
    cfg.identity.peer_addr = listener
        .local_addr()
        .map_err(|source| WorkerError::Io { path: cfg.peer_bind.clone().into(), source })?
        .to_string();
    if matches!(device, tch::Device::Cuda(_)) {
        // Used only if this worker becomes rank 0 of an NCCL generation.
        match collective::nccl::unique_id() {
            Ok(id) => cfg.identity.nccl_unique_id = id,
            Err(err) => tracing::warn!(%err, "no NCCL unique id; the nccl backend will not be available"),
        }
    }
    let join = Session::join(&cfg.coordinator, &cfg.tls, cfg.token.expose(), cfg.identity, cfg.stop.clone());
    let session = tokio::select! {
        session = join => session?,
        _ = cfg.stop.requested() => {
            tracing::warn!("stopped on request before a generation formed");
            return Ok(RunOutcome::Interrupted { step: 0 });
        }
    };
    let handle = tokio::runtime::Handle::current();
    let out = cfg.out;
    let (session, result) = tokio::task::spawn_blocking(move || {
        let mut session = session;
        let result = catch_panic(|| train::distributed::train(&mut session, &handle, device, listener, out));
        (session, result)
    })
    .await
    .expect("catch_panic returns instead of unwinding");
    match result {
        Ok(RunOutcome::Finished) => session.leave(None).await.map(|()| RunOutcome::Finished),
        Ok(RunOutcome::Interrupted { step }) => {
            session.leave_interrupted(step).await?;
            tracing::warn!(step, "stopped on request; the job resumes from the checkpoint of this step");
            Ok(RunOutcome::Interrupted { step })
        }
        Err(err) => {
            let message = err.to_string();
            if let Err(leave_err) = session.leave(Some(&message)).await {
                tracing::warn!(%leave_err, "could not report the failure to the coordinator");
            }
            Err(err)
        }
    }
}

/// Runs `f`, turning a panic into [`WorkerError::Panicked`] so that the caller can still
/// report it (most tch calls panic on LibTorch errors, CUDA running out of memory among them).
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T, WorkerError>) -> Result<T, WorkerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = match (payload.downcast_ref::<String>(), payload.downcast_ref::<&str>()) {
            (Some(s), _) => s.clone(),
            (None, Some(s)) => s.to_string(),
            (None, None) => "a panic without a message".to_string(),
        };
        Err(WorkerError::Panicked { message })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libtorch_panic_becomes_an_error_with_its_message() {
        let result: Result<(), WorkerError> = catch_panic(|| {
            let _ =
                tch::Tensor::zeros([2], tch::kind::FLOAT_CPU) + tch::Tensor::zeros([3], tch::kind::FLOAT_CPU);
            Ok(())
        });
        let message = result.unwrap_err().to_string();
        assert!(message.starts_with("training stopped on an unexpected error"), "{message}");
        assert!(message.contains("size of tensor a (2) must match the size of tensor b (3)"), "{message}");
        assert_eq!(catch_panic(|| Ok(7)).unwrap(), 7);
    }
}
