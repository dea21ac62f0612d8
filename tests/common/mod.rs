//! Shared harness: locate the built binaries, start a coordinator in-process on an ephemeral
//! loopback port, start workers as real processes.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    // Each job writes its own metrics file, state database and checkpoints under the system
    // temp dir.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mtl-test-{}-{n}", std::process::id()));
    // Left by an earlier test process that had the same process id: start clean.
    let _ = std::fs::remove_dir_all(&dir);
    cfg.server.metrics_file = dir.join("metrics.jsonl").display().to_string();
    cfg.server.state_db = dir.join("state.db").display().to_string();
    cfg.checkpoint.dir = dir.join("checkpoints").display().to_string();
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
        let token = cfg.job.token.expose().to_string();
        let (stop_tx, stop_rx) = oneshot::channel();
        let handle = tokio::spawn(mtl_coordinator::run(cfg, listener, async {
            let _ = stop_rx.await;
        }));
        Self { url, token, stop_tx: Some(stop_tx), handle }
    }

    /// Like [`InProcessCoordinator::start`], with the HTTP server (dashboard, metrics) on an
    /// ephemeral loopback port; returns its base URL (`http://127.0.0.1:PORT`) too.
    pub async fn start_watched(cfg: JobConfig) -> (Self, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let http_url = format!("http://{}", http.local_addr().unwrap());
        let token = cfg.job.token.expose().to_string();
        let (stop_tx, stop_rx) = oneshot::channel();
        let handle = tokio::spawn(mtl_coordinator::run_with_http(cfg, listener, Some(http), async {
            let _ = stop_rx.await;
        }));
        (Self { url, token, stop_tx: Some(stop_tx), handle }, http_url)
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

    /// Ends the coordinator abruptly, as a kill would: its task is dropped mid-flight, with no
    /// shutdown path run. What it had stored is all a restarted one gets.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }

    /// Stops the coordinator and returns how the job ended.
    pub async fn stop(mut self) -> JobReport {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        self.report().await
    }
}

/// Starts `worker run` against a coordinator, with its output captured; the token goes in
/// `MTL_JOB_TOKEN`.
pub fn spawn_worker(url: &str, token: &str, worker_id: &str) -> Child {
    spawn_worker_with(url, token, worker_id, &[])
}

/// Like [`spawn_worker`] with extra arguments.
pub fn spawn_worker_with(url: &str, token: &str, worker_id: &str, extra: &[&str]) -> Child {
    Command::new(bin("worker"))
        .args(["run", "--coordinator", url, "--worker-id", worker_id, "--device", "cpu"])
        .args(extra)
        .env("MTL_JOB_TOKEN", token)
        .env("RUST_LOG", "info")
        // One LibTorch thread per worker, as the demo runs them: several workers that each start a
        // thread per core oversubscribe a small machine and their spinning threads stall steps.
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

/// `GET path` over HTTP/1.1 from `base` (`http://HOST:PORT`), with the bearer token if given;
/// returns the status code and the body.
pub async fn http_get(base: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.strip_prefix("http://").expect("an http:// URL");
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect to the HTTP server");
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "this client reads whole bodies only:\n{head}"
    );
    (code, body.to_string())
}

/// Waits for the coordinator to write its address file; returns the address.
pub fn bound_address(addr_file: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(addr) = std::fs::read_to_string(addr_file) {
            if !addr.trim().is_empty() {
                return addr.trim().to_string();
            }
        }
        assert!(Instant::now() < deadline, "the coordinator did not start listening");
        std::thread::sleep(Duration::from_millis(20)); // polling for the file, not syncing
    }
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

/// A worker simulated over gRPC: registers, heartbeats, asks for shards, reports, commits.
pub struct FakeWorker {
    pub client: CoordinatorClient<tonic::transport::Channel>,
    pub token: String,
    pub worker_id: String,
    pub generation: u64,
}

impl FakeWorker {
    pub async fn connect(url: &str, token: &str, worker_id: &str) -> Self {
        let client = CoordinatorClient::connect(url.to_string()).await.expect("connect to the coordinator");
        Self { client, token: token.into(), worker_id: worker_id.into(), generation: 0 }
    }

    /// Register: joins the next generation (`generation` 0) or re-attaches to one.
    pub async fn register(
        &mut self,
        generation: u64,
        step: u64,
    ) -> Result<mtl_proto::v1::RegisterResponse, tonic::Status> {
        let reply = self
            .client
            .register(mtl_proto::v1::RegisterRequest {
                job_token: self.token.clone(),
                worker_id: self.worker_id.clone(),
                host: "fake".into(),
                device: "cpu".into(),
                peer_addr: format!("{}:1", self.worker_id),
                generation,
                step,
                ..Default::default()
            })
            .await?
            .into_inner();
        self.generation = reply.generation;
        Ok(reply)
    }

    pub async fn heartbeat(&mut self, step: u64) -> Result<mtl_proto::v1::HeartbeatResponse, tonic::Status> {
        let request = mtl_proto::v1::HeartbeatRequest {
            job_token: self.token.clone(),
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step,
            phase: mtl_proto::v1::WorkerPhase::Step as i32,
            collective_seq: step,
        };
        Ok(self.client.heartbeat(request).await?.into_inner())
    }

    /// This worker's train shard of `epoch` of a split of `samples` samples.
    pub async fn train_shard(
        &mut self,
        epoch: u64,
        samples: u64,
        steps_done: u64,
        epoch_position: Option<u64>,
    ) -> Result<mtl_proto::v1::ShardResponse, tonic::Status> {
        let request = mtl_proto::v1::ShardRequest {
            job_token: self.token.clone(),
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            split: mtl_proto::v1::Split::Train as i32,
            epoch,
            dataset_samples: samples,
            dataset_fingerprint: "fake".into(),
            steps_done,
            epoch_position,
        };
        Ok(self.client.get_shard(request).await?.into_inner())
    }

    pub async fn report_train(&mut self, step: u64, epoch: u64, loss: f64) -> Result<(), tonic::Status> {
        let request = mtl_proto::v1::MetricsReport {
            job_token: self.token.clone(),
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            rank: 0,
            kind: mtl_proto::v1::MetricsKind::Train as i32,
            step,
            epoch,
            scalars: [("loss/cls".to_string(), loss)].into_iter().collect(),
            eval_stats_json: Vec::new(),
        };
        self.client.report_metrics(request).await.map(drop)
    }

    /// Commits the checkpoint directory `path` taken at `step` (`epoch`, `epoch_position`).
    pub async fn commit(
        &mut self,
        path: &str,
        step: u64,
        epoch: u64,
        epoch_position: u64,
        config_hash: &str,
    ) -> Result<mtl_proto::v1::CheckpointAck, tonic::Status> {
        let request = mtl_proto::v1::CheckpointCommit {
            job_token: self.token.clone(),
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            step,
            epoch,
            epoch_position,
            path: path.into(),
            config_hash: config_hash.into(),
            ..Default::default()
        };
        Ok(self.client.commit_checkpoint(request).await?.into_inner())
    }

    pub async fn leave(&mut self) -> Result<(), tonic::Status> {
        let request = mtl_proto::v1::LeaveRequest {
            job_token: self.token.clone(),
            worker_id: self.worker_id.clone(),
            generation: self.generation,
            failed: false,
            message: String::new(),
            ..Default::default()
        };
        self.client.leave(request).await.map(drop)
    }
}

/// Polls `status` until `done` holds (at most two minutes).
pub async fn poll_until(url: &str, token: &str, done: impl Fn(&JobStatus) -> bool) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut client) = CoordinatorClient::connect(url.to_string()).await {
            if let Ok(status) = client.get_status(StatusRequest { job_token: token.into() }).await {
                let status = status.into_inner();
                if done(&status) {
                    return status;
                }
            }
        }
        assert!(Instant::now() < deadline, "the awaited job state never came");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the live status, not syncing
    }
}

/// Asserts that two checkpoint directories hold the same model, optimizer and weighting bytes.
pub fn same_tensors(a: &Path, b: &Path) {
    for file in ["model.safetensors", "optimizer.safetensors", "weighting.safetensors"] {
        let (x, y) = (std::fs::read(a.join(file)).unwrap(), std::fs::read(b.join(file)).unwrap());
        assert!(x == y, "{file} of {} and {} differ", a.display(), b.display());
    }
}

/// `coordinator serve` on `cfg`, listening on `listen`.
pub fn spawn_coordinator(cfg: &JobConfig, dir: &Path, listen: &str) -> (Child, PathBuf) {
    let file = dir.join("job.toml");
    std::fs::write(&file, cfg.to_toml()).unwrap(); // without the token: that comes from the environment
    let addr_file = dir.join(format!("addr-{}", listen.replace(':', "_")));
    let child = Command::new(bin("coordinator"))
        .args(["serve", "--config", file.to_str().unwrap(), "--listen", listen])
        .args(["--addr-file", addr_file.to_str().unwrap()])
        .env("MTL_JOB_TOKEN", cfg.job.token.expose())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, addr_file)
}
