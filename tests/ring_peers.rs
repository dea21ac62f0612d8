//! Ring peers prove that they belong to the job (docs/SECURITY.md). Strangers hammer both
//! workers' ring ports for a whole run, from before the workers start: silent connections held
//! open, junk, and hellos in the ring's own format for every generation and rank with a forged
//! proof. The job trains exactly as it does without them, and the workers log each refusal
//! with the stranger's address.
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{job, spawn_worker_with, tiny_data, wait, InProcessCoordinator};
use mtl_coordinator::JobOutcome;
use mtl_proto::v1::{MetricPoint, MetricsKind};

/// Free loopback ports for the workers' ring listeners.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// One stranger's attempt number `i` on `addr`; silent connections are returned to be held.
fn attempt(addr: SocketAddr, i: usize) -> Option<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok();
    match i % 3 {
        0 => return Some(stream), // says nothing, holds the connection
        1 => {
            let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: ring\r\n\r\n");
        }
        _ => {
            // The ring's hello format for a guessed generation and rank, then a forged proof.
            let mut hello = b"MTL2".to_vec();
            hello.extend(((i / 3 % 3) as u64 + 1).to_le_bytes());
            hello.extend(((i / 9 % 2) as u64).to_le_bytes());
            hello.extend([7u8; 16]);
            let _ = stream.write_all(&hello);
            let mut answer = [0u8; 48];
            if stream.read_exact(&mut answer).is_ok() {
                let _ = stream.write_all(&answer[16..]);
            }
        }
    }
    None
}

/// Trains a 2-worker job whose ring ports are fixed; with `strangers`, they attack those ports
/// from before the workers start to the end. Returns the training history and worker logs.
async fn train(strangers: bool) -> (Vec<MetricPoint>, Vec<String>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[rendezvous]\nmin_workers = 2\n[train]\nsteps = 8\nbatch_size = 4\nlr = 0.05\nlog_every_steps = 2\n",
        tiny_data(&dir.path().join("data"), 48)
    );
    let coord = InProcessCoordinator::start(job(&body)).await;
    let ports = free_ports(2);
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let attacker = strangers.then(|| {
        let (stop, attempts, ports) = (stop.clone(), attempts.clone(), ports.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                for port in &ports {
                    held.extend(attempt(SocketAddr::from(([127, 0, 0, 1], *port)), i));
                }
                if held.len() > 100 {
                    held.drain(..50);
                }
                i += 1;
                attempts.store(i, Ordering::SeqCst);
                // Pacing of the attack, not synchronisation: the test waits on the job.
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    });
    let workers: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(rank, port)| {
            let peer = format!("127.0.0.1:{port}");
            spawn_worker_with(&coord.url, &coord.token, &format!("w{rank}"), &["--peer-addr", &peer])
        })
        .collect();
    let report = coord.report().await;
    stop.store(true, Ordering::SeqCst);
    if let Some(attacker) = attacker {
        attacker.join().unwrap();
    }
    let mut logs = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        let (code, stderr) = wait(w).await;
        assert_eq!(code, Some(0), "worker {i}:\n{stderr}");
        logs.push(stderr);
    }
    assert_eq!(report.outcome, JobOutcome::Finished);
    let train = report.status.history.into_iter().filter(|p| p.kind == MetricsKind::Train as i32).collect();
    (train, logs, attempts.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_ring_ports_neither_join_nor_change_the_run() {
    let (attacked, logs, attempts) = train(true).await;
    assert!(attempts > 0);
    let refusals: Vec<&str> = logs
        .iter()
        .flat_map(|log| log.lines())
        .filter(|line| line.contains("refused a ring connection that failed the handshake"))
        .collect();
    assert!(!refusals.is_empty(), "no refusal logged:\n{}", logs.join("\n"));
    assert!(refusals.iter().all(|line| line.contains("from=127.0.0.1:")), "{refusals:?}");

    let (quiet, _, _) = train(false).await;
    // Everything but the rate and the step timings, which are wall-clock.
    let losses = |points: &[MetricPoint]| {
        points
            .iter()
            .map(|p| {
                let values: BTreeMap<String, f64> = p
                    .values
                    .iter()
                    .filter(|(k, _)| *k != "images_per_s" && !k.starts_with("time/"))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                (p.step, values)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&attacked).len(), 4);
    assert_eq!(losses(&attacked), losses(&quiet), "the strangers changed the training");
}
