//! `coordinator-load`: the real coordinator binary against many simulated workers on loopback.
//!
//! Starts `coordinator serve` as its own process (so its CPU time and memory can be read from
//! /proc), registers N simulated workers into one generation, then for `--seconds` each worker
//! heartbeats every `--heartbeat-ms`, asks for its train shard at every epoch boundary
//! (`--epoch-s`), reports evaluation statistics every `--eval-s`; rank 0 also reports training
//! losses every heartbeat and commits a checkpoint every `--checkpoint-s`. Prints RPC latency
//! percentiles per RPC and the coordinator's CPU and memory. Run it through
//! `bench/coordinator_load.sh` (release build). Not a test: nothing here asserts a time.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mtl_proto::v1::coordinator_client::CoordinatorClient;
use mtl_proto::v1::{
    CheckpointCommit, HeartbeatRequest, LeaveRequest, MetricsKind, MetricsReport, RegisterRequest,
    ShardRequest, Split, WorkerPhase,
};
use tonic::transport::Channel;

struct Args {
    workers: u32,
    seconds: u64,
    heartbeat_ms: u64,
    epoch_s: u64,
    eval_s: u64,
    checkpoint_s: u64,
    samples: u64,
    coordinator: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        workers: 1024,
        seconds: 120,
        heartbeat_ms: 1000,
        epoch_s: 20,
        eval_s: 30,
        checkpoint_s: 60,
        samples: 118_287,
        coordinator: PathBuf::from("target/release/coordinator"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || value.parse::<u64>().map_err(|e| format!("{flag} {value}: {e}"));
        match flag.as_str() {
            "--workers" => a.workers = num()? as u32,
            "--seconds" => a.seconds = num()?,
            "--heartbeat-ms" => a.heartbeat_ms = num()?,
            "--epoch-s" => a.epoch_s = num()?,
            "--eval-s" => a.eval_s = num()?,
            "--checkpoint-s" => a.checkpoint_s = num()?,
            "--samples" => a.samples = num()?,
            "--coordinator" => a.coordinator = PathBuf::from(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

/// CPU seconds (user + system) and memory of a process, from /proc.
struct Usage {
    cpu_s: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at index 2 (state).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the name), in USER_HZ
    // (100 on Linux).
    let cpu_s = (ticks(11) + ticks(12)) as f64 / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Usage { cpu_s, rss_kib: kib("VmRSS:"), peak_rss_kib: kib("VmHWM:") }
}

/// Latencies in microseconds, per RPC.
type Latencies = BTreeMap<&'static str, Vec<u64>>;

struct Sim {
    client: CoordinatorClient<Channel>,
    worker_id: String,
    generation: u64,
    rank: u32,
    config_hash: String,
    latencies: Latencies,
    errors: BTreeMap<&'static str, u64>,
}

impl Sim {
    fn record<T>(
        &mut self,
        rpc: &'static str,
        started: Instant,
        result: Result<T, tonic::Status>,
    ) -> Option<T> {
        match result {
            Ok(v) => {
                self.latencies.entry(rpc).or_default().push(started.elapsed().as_micros() as u64);
                Some(v)
            }
            Err(status) => {
                if self.errors.get(rpc).copied().unwrap_or(0) == 0 {
                    eprintln!("{} {rpc}: {status}", self.worker_id);
                }
                *self.errors.entry(rpc).or_default() += 1;
                None
            }
        }
    }
}

const TOKEN: &str = "bench";

#[allow(clippy::too_many_arguments)]
async fn simulate(
    mut sim: Sim,
    args: std::sync::Arc<Args>,
    start: tokio::time::Instant,
    offset: Duration,
    checkpoint_dir: PathBuf,
    eval_stats: std::sync::Arc<Vec<u8>>,
) -> Sim {
    let interval = Duration::from_millis(args.heartbeat_ms);
    let ticks = args.seconds * 1000 / args.heartbeat_ms;
    let per_s = 1000 / args.heartbeat_ms.max(1);
    let every = |s: u64| (s * per_s).max(1);
    for tick in 0..ticks {
        tokio::time::sleep_until(start + offset + interval * tick as u32).await;
        let step = tick + 1;
        let t = Instant::now();
        let r = sim
            .client
            .heartbeat(HeartbeatRequest {
                job_token: TOKEN.into(),
                worker_id: sim.worker_id.clone(),
                generation: sim.generation,
                step,
                phase: WorkerPhase::Step as i32,
                collective_seq: step * 2,
            })
            .await;
        sim.record("Heartbeat", t, r);
        if tick % every(args.epoch_s) == 0 {
            let t = Instant::now();
            let r = sim
                .client
                .get_shard(ShardRequest {
                    job_token: TOKEN.into(),
                    worker_id: sim.worker_id.clone(),
                    generation: sim.generation,
                    split: Split::Train as i32,
                    epoch: tick / every(args.epoch_s),
                    dataset_samples: args.samples,
                    dataset_fingerprint: "bench".into(),
                    steps_done: step - 1,
                    epoch_position: None,
                })
                .await;
            sim.record("GetShard", t, r);
        }
        if sim.rank == 0 {
            let t = Instant::now();
            let r = sim
                .client
                .report_metrics(MetricsReport {
                    job_token: TOKEN.into(),
                    worker_id: sim.worker_id.clone(),
                    generation: sim.generation,
                    rank: 0,
                    kind: MetricsKind::Train as i32,
                    step,
                    epoch: 0,
                    scalars: [("loss/cls", 0.5), ("loss/det", 1.5), ("loss/seg", 0.7), ("lr", 0.01)]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                    eval_stats_json: Vec::new(),
                })
                .await;
            sim.record("ReportMetrics(train)", t, r);
        }
        if step % every(args.eval_s) == 0 {
            let t = Instant::now();
            let r = sim
                .client
                .report_metrics(MetricsReport {
                    job_token: TOKEN.into(),
                    worker_id: sim.worker_id.clone(),
                    generation: sim.generation,
                    rank: sim.rank,
                    kind: MetricsKind::Eval as i32,
                    step,
                    epoch: 0,
                    scalars: Default::default(),
                    eval_stats_json: eval_stats.as_ref().clone(),
                })
                .await;
            sim.record("ReportMetrics(eval)", t, r);
        }
        if sim.rank == 0 && step % every(args.checkpoint_s) == 0 {
            let name = format!("step-{step}");
            std::fs::create_dir_all(checkpoint_dir.join(&name)).expect("checkpoint directory");
            let t = Instant::now();
            let r = sim
                .client
                .commit_checkpoint(CheckpointCommit {
                    job_token: TOKEN.into(),
                    worker_id: sim.worker_id.clone(),
                    generation: sim.generation,
                    step,
                    epoch: 0,
                    epoch_position: 0,
                    path: name,
                    config_hash: sim.config_hash.clone(),
                    ..Default::default()
                })
                .await;
            sim.record("CommitCheckpoint", t, r);
        }
    }
    sim
}

fn start_coordinator(args: &Args, dir: &Path) -> Result<(Child, String), String> {
    let config = format!(
        "[job]\nname = \"load\"\ntoken = \"{TOKEN}\"\n\
         [server]\nlisten = \"127.0.0.1:0\"\nmetrics_file = \"{dir}/metrics.jsonl\"\nstate_db = \"{dir}/state.db\"\n\
         [rendezvous]\nmin_workers = {n}\nmax_workers = {n}\ntimeout_ms = 600000\nheartbeat_interval_ms = {hb}\n\
         heartbeat_timeout_ms = 60000\n\
         [train]\nbatch_size = 8\n[checkpoint]\ndir = \"{dir}/checkpoints\"\nkeep_last = 3\n",
        dir = dir.display(),
        n = args.workers,
        hb = args.heartbeat_ms,
    );
    let config_path = dir.join("load.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let addr_file = dir.join("addr");
    let child = Command::new(&args.coordinator)
        .args(["serve", "--config"])
        .arg(&config_path)
        .arg("--addr-file")
        .arg(&addr_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{}: {e}", args.coordinator.display()))?;
    for _ in 0..200 {
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            if !addr.is_empty() {
                return Ok((child, format!("http://{addr}")));
            }
        }
        std::thread::sleep(Duration::from_millis(50)); // waiting for another process to bind
    }
    Err("the coordinator did not write its address within 10 s".into())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn eval_stats() -> Vec<u8> {
    let mut stats = mtl_metrics::EvalStats::default();
    let mut cls = mtl_metrics::ClassificationStats::new(10).expect("10 classes");
    for i in 0..64 {
        cls.add(i % 10, (i * 7) % 10).expect("in range");
    }
    stats.classification = Some(cls);
    serde_json::to_vec(&stats).expect("statistics serialise")
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = std::sync::Arc::new(parse_args()?);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (mut coordinator, url) = start_coordinator(&args, dir.path())?;
    let pid = coordinator.id();
    println!(
        "coordinator pid {pid} at {url}; {} workers, heartbeat every {} ms, {} s",
        args.workers, args.heartbeat_ms, args.seconds
    );

    // Every simulated worker has its own connection, as real workers do.
    let mut clients = Vec::new();
    for _ in 0..args.workers {
        let endpoint = Channel::from_shared(url.clone()).map_err(|e| e.to_string())?;
        clients.push(endpoint.connect().await.map_err(|e| format!("connect: {e}"))?);
    }
    let registered = Instant::now();
    let mut joins = Vec::new();
    for (i, channel) in clients.into_iter().enumerate() {
        joins.push(tokio::spawn(async move {
            let mut client = CoordinatorClient::new(channel);
            let worker_id = format!("w{i:05}");
            let t = Instant::now();
            let placement = client
                .register(RegisterRequest {
                    job_token: TOKEN.into(),
                    worker_id: worker_id.clone(),
                    host: "sim".into(),
                    device: "cpu".into(),
                    peer_addr: format!("127.0.0.1:{}", 20000 + i),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("{worker_id} Register: {s}"))?
                .into_inner();
            let register_us = t.elapsed().as_micros() as u64;
            Ok::<_, String>((
                Sim {
                    client,
                    worker_id,
                    generation: placement.generation,
                    rank: placement.rank,
                    config_hash: placement.config_hash,
                    latencies: Latencies::new(),
                    errors: BTreeMap::new(),
                },
                register_us,
            ))
        }));
    }
    let mut sims = Vec::new();
    for j in joins {
        sims.push(j.await.map_err(|e| e.to_string())??.0);
    }
    let rendezvous_s = registered.elapsed().as_secs_f64();
    println!("rendezvous of {} workers: {rendezvous_s:.2} s", sims.len());

    let before = usage(pid);
    let load_start = Instant::now();
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let spread = Duration::from_millis(args.heartbeat_ms) / args.workers.max(1);
    let eval = std::sync::Arc::new(eval_stats());
    let checkpoint_dir = dir.path().join("checkpoints");
    let mut joins = Vec::new();
    for (i, sim) in sims.into_iter().enumerate() {
        joins.push(tokio::spawn(simulate(
            sim,
            args.clone(),
            start,
            spread * i as u32,
            checkpoint_dir.clone(),
            eval.clone(),
        )));
    }
    let mut peak_rss_during = 0;
    let mut sims = Vec::new();
    for j in joins {
        sims.push(j.await.map_err(|e| e.to_string())?);
        peak_rss_during = peak_rss_during.max(usage(pid).rss_kib);
    }
    let wall = load_start.elapsed().as_secs_f64();
    let after = usage(pid);

    let mut all: Latencies = Latencies::new();
    let mut errors: BTreeMap<&str, u64> = BTreeMap::new();
    for sim in &mut sims {
        for (rpc, mut v) in std::mem::take(&mut sim.latencies) {
            all.entry(rpc).or_default().append(&mut v);
        }
        for (rpc, n) in &sim.errors {
            *errors.entry(rpc).or_default() += n;
        }
    }
    let mut every: Vec<u64> = all.values().flatten().copied().collect();
    println!("\n{:<22} {:>9} {:>9} {:>9} {:>9}", "rpc", "calls", "p50 ms", "p99 ms", "max ms");
    for (rpc, v) in all.iter_mut() {
        v.sort_unstable();
        println!(
            "{rpc:<22} {:>9} {:>9.2} {:>9.2} {:>9.2}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0)
        );
    }
    every.sort_unstable();
    println!(
        "{:<22} {:>9} {:>9.2} {:>9.2} {:>9.2}",
        "all",
        every.len(),
        percentile(&every, 0.5),
        percentile(&every, 0.99),
        percentile(&every, 1.0)
    );
    println!("errors: {}", if errors.is_empty() { "none".to_string() } else { format!("{errors:?}") });
    println!(
        "coordinator: {:.1}% of one core over {wall:.0} s ({:.2} CPU s), RSS {:.1} MiB (peak {:.1} MiB)",
        100.0 * (after.cpu_s - before.cpu_s) / wall,
        after.cpu_s - before.cpu_s,
        after.rss_kib as f64 / 1024.0,
        after.peak_rss_kib.max(peak_rss_during) as f64 / 1024.0
    );

    for mut sim in sims {
        let _ = sim
            .client
            .leave(LeaveRequest {
                job_token: TOKEN.into(),
                worker_id: sim.worker_id.clone(),
                generation: sim.generation,
                failed: false,
                message: String::new(),
                ..Default::default()
            })
            .await;
    }
    let status = tokio::task::spawn_blocking(move || coordinator.wait()).await.map_err(|e| e.to_string())?;
    println!("coordinator exited: {}", status.map_err(|e| e.to_string())?);
    Ok(())
}
