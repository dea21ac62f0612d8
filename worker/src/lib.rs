//! The worker: the data plane of a training job, one process per GPU (or a CPU worker for
//! development and CI). It joins the coordinator's job ([`session`]), runs LibTorch steps
//! through `tch`, and reports metrics. Layout: `session` (coordinator RPCs and heartbeats),
//! `device` (device selection), `smoke` (the one-step trainer used by `worker run`), `data`
//! (batches), `model` (backbone, FPN, the multi-task network), `tasks` (heads and losses).
#![warn(missing_docs)]

pub mod collective;
pub mod commands;
pub mod data;
pub mod device;
mod error;
pub mod model;
pub mod optim;
pub mod session;
pub mod smoke;
pub mod tasks;
pub mod train;
pub mod weighting;

use std::collections::HashMap;

pub use error::WorkerError;
use mtl_proto::v1::MetricsKind;

use crate::session::{Identity, Session};

/// Where `worker run` connects and who it says it is.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The coordinator's URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// The job token.
    pub token: String,
    /// This worker's identity.
    pub identity: Identity,
}

/// Joins the job, trains, reports, leaves. A failure is reported to the coordinator before
/// it is returned, so the job fails fast instead of waiting for a heartbeat timeout.
pub async fn run(cfg: RunConfig) -> Result<(), WorkerError> {
    let device = device::parse_device(&cfg.identity.device)?;
    let mut session = Session::join(&cfg.coordinator, &cfg.token, cfg.identity).await?;
    match train(&mut session, device).await {
        Ok(()) => session.leave(None).await,
        Err(err) => {
            let message = err.to_string();
            if let Err(leave_err) = session.leave(Some(&message)).await {
                tracing::warn!(%leave_err, "could not report the failure to the coordinator");
            }
            Err(err)
        }
    }
}

async fn train(session: &mut Session, device: tch::Device) -> Result<(), WorkerError> {
    let seed = session.config.job.seed + u64::from(session.placement.rank);
    let batch = i64::from(session.config.train.batch_size);
    let lr = session.config.train.lr;
    for step in 1..=session.config.train.steps {
        session.check_stop()?;
        let loss = tokio::task::spawn_blocking(move || smoke::tiny_step(seed + step, device, batch, lr))
            .await
            .expect("training thread panicked")?;
        session.set_step(step);
        tracing::info!(rank = session.placement.rank, step, loss, "step done");
        session
            .report(MetricsKind::Train, step, 0, HashMap::from([("loss".to_string(), loss)]), Vec::new())
            .await?;
    }
    Ok(())
}
