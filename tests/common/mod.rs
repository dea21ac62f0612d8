//! Shared harness: locate the built binaries, start a coordinator in-process on an ephemeral
//! loopback port, start workers as real processes.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use mtl_coordinator::{JobConfig, JobReport};
use mtl_proto::v1::coordinator_client::CoordinatorClient;
use mtl_proto::v1::{JobStatus, StatusRequest};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A binary of this workspace, built by `cargo build --bins` next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo build --workspace --bins` before the tests (make test does)",
        path.display()
    );
    path
}

/// TOML for a tiny synthetic dataset in `dir` and the tiny model: 32 px, a few dozen images.
pub fn tiny_data(dir: &std::path::Path, n: u32) -> String {
    format!(
        "[data]\nformat = \"synthetic\"\ntrain = \"{}\"\nsynthetic_n = {n}\nsynthetic_size = 32\nimage_size = 32\nloader_threads = 1\n\
         [model]\nbackbone = \"tiny\"\nnorm = \"group\"\n",
        dir.display()
    )
}

/// A job config for tests: `[job]` with a token, then `body` (sections), on port 0.
pub fn job(body: &str) -> JobConfig {
    let text = format!("[job]\nname = \"test\"\ntoken = \"t0k\"\n{body}\n");
    let mut cfg = JobConfig::from_toml(&text).expect("test job config");
    cfg.server.listen = "127.0.0.1:0".into();
    // Each job writes its own metrics file under the system temp dir.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file =
        std::env::temp_dir().join(format!("mtl-test-{}-{n}", std::process::id())).join("metrics.jsonl");
    cfg.server.metrics_file = file.display().to_string();
    cfg
}

/// A coordinator served in-process.
pub struct InProcessCoordinator {
    pub url: String,
    pub token: String,
    stop_tx: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<JobReport, mtl_coordinator::CoordinatorError>>,
}

impl InProcessCoordinator {
    pub async fn start(cfg: JobConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let token = cfg.job.token.clone();
        let (stop_tx, stop_rx) = oneshot::channel();
        let handle = tokio::spawn(mtl_coordinator::run(cfg, listener, async {
            let _ = stop_rx.await;
        }));
        Self { url, token, stop_tx: Some(stop_tx), handle }
    }

    /// The live status over gRPC (only while the job runs: the server stops when it ends).
    pub async fn status(&self) -> JobStatus {
        let mut client = CoordinatorClient::connect(self.url.clone()).await.unwrap();
        client.get_status(StatusRequest { job_token: self.token.clone() }).await.unwrap().into_inner()
    }

    /// Waits for the job to end by itself (every worker left, or one failed/was lost).
    pub async fn report(self) -> JobReport {
        self.handle.await.expect("coordinator task").expect("coordinator ran")
    }

    /// Stops the coordinator and returns how the job ended.
    pub async fn stop(mut self) -> JobReport {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        self.report().await
    }
}

/// Starts `worker run` against a coordinator, with its output captured.
pub fn spawn_worker(url: &str, token: &str, worker_id: &str) -> Child {
    spawn_worker_with(url, token, worker_id, &[])
}

/// Like [`spawn_worker`] with extra arguments.
pub fn spawn_worker_with(url: &str, token: &str, worker_id: &str, extra: &[&str]) -> Child {
    Command::new(bin("worker"))
        .args(["run", "--coordinator", url, "--token", token, "--worker-id", worker_id, "--device", "cpu"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

/// Waits for a child off the async runtime and returns (exit code, stderr).
pub async fn wait(child: Child) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let out = child.wait_with_output().expect("wait for child");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    })
    .await
    .unwrap()
}
