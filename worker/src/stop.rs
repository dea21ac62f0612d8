//! A request to stop training early and resumably: from a signal (SIGTERM from Slurm's
//! `scancel` or preemption, or from Kubernetes deleting the pod; SIGINT from Ctrl-C) or from the
//! coordinator (`DIRECTIVE_INTERRUPT`, when it was asked to stop itself).
//!
//! A rank that holds a request says so in the next step's first all-reduce, so every rank
//! learns it after the same step: all of them stop there, rank 0 commits a checkpoint of it and
//! they leave as interrupted (docs/DURABILITY.md, "Stopping on request").
use std::sync::Arc;

use tokio::sync::watch;

/// Whether a stop was requested; cheap to clone and to read from the training thread.
#[derive(Debug, Clone)]
pub struct StopRequest {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for StopRequest {
    fn default() -> Self {
        Self { tx: Arc::new(watch::channel(false).0) }
    }
}

impl StopRequest {
    /// No stop requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop after the current step; returns whether it had been asked before.
    pub fn request(&self) -> bool {
        self.tx.send_replace(true)
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once a stop is requested.
    pub(crate) async fn requested(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// The exit status of a `worker run` that stopped on request after its final checkpoint was
/// committed (sysexits' `EX_TEMPFAIL`: run it again to continue). Also the coordinator's.
pub const EXIT_INTERRUPTED: u8 = 75;

/// Listens for SIGTERM and SIGINT on the current tokio runtime: the first requests a stop
/// through `stop`, a second one ends the process at once with status 128 + the signal's number
/// (work since the last committed checkpoint is lost). Only signals count: a stop the
/// coordinator asked for first (its own SIGTERM, which a launcher also forwards to its local
/// workers) leaves the next signal a first one.
pub fn stop_on_signals(stop: StopRequest) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut signalled = false;
        loop {
            let (name, number) = tokio::select! {
                _ = term.recv() => ("SIGTERM", 15),
                _ = int.recv() => ("SIGINT", 2),
            };
            stop.request();
            if std::mem::replace(&mut signalled, true) {
                tracing::warn!(signal = name, "second signal: stopping at once, without a checkpoint");
                std::process::exit(128 + number);
            }
            tracing::warn!(
                signal = name,
                "stop requested: finishing the current step, then a final checkpoint (signal again to stop at once)"
            );
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_request_is_seen_by_every_clone_and_wakes_a_waiter() {
        let stop = super::StopRequest::new();
        let seen = stop.clone();
        assert!(!seen.is_requested());
        let waiter = tokio::spawn({
            let stop = stop.clone();
            async move { stop.requested().await }
        });
        assert!(!stop.request(), "the first request");
        assert!(stop.request(), "the second one says so");
        assert!(seen.is_requested());
        waiter.await.unwrap();
    }
}
