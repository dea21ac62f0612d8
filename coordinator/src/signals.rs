//! SIGTERM and SIGINT for `coordinator serve`: the first asks the job to stop with a final
//! checkpoint (Slurm's `scancel` and preemption, Kubernetes deleting the pod, Ctrl-C), a
//! second one stops at once.
use std::future::Future;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::oneshot;

/// Two futures: the first resolves (with the signal's name) on the first SIGTERM or SIGINT,
/// the second on the next one. The handlers are installed before this returns.
pub(crate) fn first_and_second(
) -> std::io::Result<(impl Future<Output = &'static str> + Send, impl Future<Output = ()> + Send)> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (first_tx, first_rx) = oneshot::channel();
    let (second_tx, second_rx) = oneshot::channel();
    tokio::spawn(async move {
        let name = next(&mut term, &mut int).await;
        tracing::warn!(signal = name, "stop requested (signal again to stop at once)");
        let _ = first_tx.send(name);
        let name = next(&mut term, &mut int).await;
        tracing::warn!(signal = name, "second signal: stopping at once");
        let _ = second_tx.send(());
    });
    let first = async move { first_rx.await.unwrap_or("shutdown") };
    let second = async move {
        if second_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    Ok((first, second))
}

/// The next SIGTERM or SIGINT, by name.
async fn next(term: &mut Signal, int: &mut Signal) -> &'static str {
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
