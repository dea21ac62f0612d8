//! The coordinator: the control plane of a multi-task training job.
//!
//! It owns the job configuration, forms generations of workers (rendezvous), watches their
//! heartbeats, accounts for every sample of every epoch, commits and prunes checkpoints,
//! records the metrics they report and decides when the job is over; all of it survives a
//! restart through the job's state database. It never touches tensors and does not link
//! LibTorch. Layout: [`state`] is the job's state machine (pure, clock passed in) over
//! `accounting` (epoch samples), `checkpoints` (path check, pruning), `history` (metrics,
//! exported to `metrics.jsonl` and to TensorBoard event files by `tensorboard`) and `store`
//! (SQLite); `token` gives every job a token; `service` is its gRPC face (each request
//! bounded by `limits`), `web` its read-only HTTP face (dashboard, Prometheus metrics),
//! [`run`] and [`run_with_stop`] wire them to listeners (the latter stops with a final
//! checkpoint when asked: `coordinator serve` asks on SIGTERM/SIGINT), and [`status`] renders
//! a job's status for `coordinator status`.
#![warn(missing_docs)]

mod accounting;
mod checkpoints;
mod error;
mod history;
mod limits;
mod service;
pub mod state;
pub mod status;
mod store;
mod tensorboard;
mod tls;
mod token;
mod web;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use error::CoordinatorError;
pub use mtl_job::JobConfig;
use mtl_proto::v1::coordinator_server::CoordinatorServer;
pub use state::Phase;
pub use token::ensure as ensure_token;

/// Reads and checks the TLS files `[server]` names; the error names the key and the file.
pub fn check_tls(server: &mtl_job::ServerSection) -> Result<(), CoordinatorError> {
    tls::server_config(server).map(|_| ())
}
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::service::{CoordinatorService, Shared};
use crate::state::JobState;

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Every worker finished.
    Finished,
    /// A worker failed or was lost.
    Failed(String),
    /// Stopped at once (the shutdown signal, a second stop signal, or workers that did not
    /// stop within `server.stop_timeout_ms`): the job resumes from its newest committed
    /// checkpoint, which may be older than the last step trained.
    Interrupted,
    /// Stopped on request: every worker finished its step and left after rank 0 committed the
    /// checkpoint of it (or no generation was training). The job resumes from `checkpoint_step`.
    Stopped {
        /// The newest committed checkpoint.
        checkpoint_step: Option<u64>,
    },
}

/// The exit status of `coordinator serve` for [`JobOutcome::Stopped`] (sysexits'
/// `EX_TEMPFAIL`: start it again to continue); `worker run` uses the same.
pub const EXIT_STOPPED: u8 = 75;

/// What [`run`] returns: how the job ended and its final status (workers, metrics history).
#[derive(Debug, Clone)]
pub struct JobReport {
    /// How the job ended.
    pub outcome: JobOutcome,
    /// The job's status at the end.
    pub status: mtl_proto::v1::JobStatus,
}

/// Serves the job on `listener` until it finishes, fails, or `shutdown` resolves (then it stops
/// at once), with the HTTP server (dashboard, metrics) on `server.http_listen` unless that is
/// empty. A job given no token gets one (see [`mtl_job::ServerSection::token_path`]).
pub async fn run(
    cfg: JobConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<JobReport, CoordinatorError> {
    let http = web::bind(&cfg.server.http_listen).await?;
    serve(cfg, listener, http, std::future::pending(), shutdown).await
}

/// [`run`] with the HTTP server on a listener of the caller's (`None`: no HTTP server) instead
/// of `server.http_listen`: a caller that binds port 0 knows the address before the job starts.
pub async fn run_with_http(
    cfg: JobConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<JobReport, CoordinatorError> {
    serve(cfg, listener, http, std::future::pending(), shutdown).await
}

/// Serves the job like [`run`]. When `stop` resolves, the running generation is told to stop:
/// its workers finish their step, rank 0 commits a checkpoint of it, they leave, and the job
/// ends [`JobOutcome::Stopped`], recorded as interrupted and resumable. The wait is bounded by
/// `server.stop_timeout_ms`; after it, or when `shutdown` resolves, the coordinator stops at once.
pub async fn run_with_stop(
    cfg: JobConfig,
    listener: TcpListener,
    stop: impl Future<Output = &'static str> + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<JobReport, CoordinatorError> {
    let http = web::bind(&cfg.server.http_listen).await?;
    serve(cfg, listener, http, stop, shutdown).await
}

/// What [`run`], [`run_with_http`] and [`run_with_stop`] share.
async fn serve(
    cfg: JobConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    stop: impl Future<Output = &'static str> + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<JobReport, CoordinatorError> {
    let mut cfg = cfg;
    token::ensure(&mut cfg)?;
    let tls = tls::server_config(&cfg.server)?;
    let mutual = !cfg.server.tls_client_ca.is_empty();
    let addr = listener.local_addr().ok();
    let heartbeat_check = Duration::from_millis(u64::from(cfg.rendezvous.heartbeat_interval_ms));
    let (changed_tx, mut changed_rx) = watch::channel(());
    let rendezvous_timeout = Duration::from_millis(cfg.rendezvous.timeout_ms);
    let min_workers = cfg.rendezvous.min_workers;
    let http_require_token = cfg.server.http_require_token;
    let stop_timeout = Duration::from_millis(cfg.server.stop_timeout_ms);
    let state = JobState::new(cfg, Instant::now())?;
    if *state.phase() == Phase::Finished {
        // Nothing to serve: the state database says the job is done.
        return Ok(JobReport { outcome: JobOutcome::Finished, status: state.status(Instant::now()) });
    }
    let shared = Shared {
        rendezvous_timeout,
        min_workers,
        state: Arc::new(Mutex::new(state)),
        changed_tx: Arc::new(changed_tx),
    };
    match (&tls, mutual) {
        (None, _) => tracing::info!(?addr, "coordinator serving (plain HTTP/2: no [server] tls_cert)"),
        (Some(_), false) => tracing::info!(?addr, "coordinator serving over TLS"),
        (Some(_), true) => tracing::info!(?addr, "coordinator serving over mutual TLS"),
    }
    // Stops with the gRPC server (dropped when this function returns).
    let _web = http.map(|listener| web::spawn(listener, shared.clone(), http_require_token));

    let outcome = {
        let shared = shared.clone();
        async move {
            let mut tick = tokio::time::interval(heartbeat_check);
            tokio::pin!(stop);
            let mut stop_deadline: Option<tokio::time::Instant> = None;
            loop {
                let timed_out = async {
                    match stop_deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    why = &mut stop, if stop_deadline.is_none() => {
                        stop_deadline = Some(tokio::time::Instant::now() + stop_timeout);
                        match shared.lock().request_stop(why) {
                            Ok(true) => tracing::warn!(signal = why, timeout_ms = stop_timeout.as_millis() as u64,
                                "stopping: the workers finish their step and commit a checkpoint"),
                            Ok(false) => {}
                            Err(err) => tracing::error!(%err, "cannot record the stop request"),
                        }
                    }
                    _ = timed_out => {
                        let step = shared.lock().resume_step();
                        tracing::error!(
                            timeout_ms = stop_timeout.as_millis() as u64,
                            resume_step = ?step,
                            "the workers did not stop within server.stop_timeout_ms; stopping now"
                        );
                        shared.changed_tx.send_replace(());
                        return JobOutcome::Interrupted;
                    }
                    _ = tick.tick() => {
                        match shared.lock().check_liveness(Instant::now()) {
                            Ok(lost) if lost.is_empty() => {}
                            Ok(_) => { shared.changed_tx.send_replace(()); }
                            Err(err) => tracing::error!(%err, "cannot record lost workers"),
                        }
                    }
                    changed = changed_rx.changed() => if changed.is_err() { return JobOutcome::Interrupted },
                }
                let outcome = {
                    let state = shared.lock();
                    match state.phase() {
                        Phase::Finished => JobOutcome::Finished,
                        Phase::Failed(reason) => JobOutcome::Failed(reason.clone()),
                        _ if state.stop_done() => {
                            JobOutcome::Stopped { checkpoint_step: state.resume_step() }
                        }
                        _ => continue,
                    }
                };
                // Wakes the registrations still waiting (a newcomer waits without a timeout),
                // so that they answer the job's end and the server can shut down.
                shared.changed_tx.send_replace(());
                return outcome;
            }
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<JobOutcome>();
    let outcome_or_shutdown = async move {
        let outcome = tokio::select! {
            outcome = outcome => outcome,
            _ = shutdown => JobOutcome::Interrupted,
        };
        let _ = stop_tx.send(outcome);
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let server = server
        .layer(limits::WireLimitLayer)
        .add_service(
            CoordinatorServer::new(CoordinatorService { shared: shared.clone() })
                .max_decoding_message_size(mtl_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(mtl_proto::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a response written in several frames waits for the client's
            // delayed ACK: 40 ms on every GetShard (bench/coordinator_load.sh).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            outcome_or_shutdown,
        );
    server.await?;
    let outcome = stop_rx.await.unwrap_or(JobOutcome::Interrupted);
    tracing::info!(?outcome, "coordinator done");
    let status = {
        let mut state = shared.lock();
        state.close_exports();
        state.status(Instant::now())
    };
    Ok(JobReport { outcome, status })
}
