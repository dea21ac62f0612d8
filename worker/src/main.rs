//! `worker`: join a job served by a coordinator and train on one device.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mtl_worker::collective::bench;
use mtl_worker::session::Identity;
use mtl_worker::RunConfig;

#[derive(Parser)]
#[command(
    version,
    about = "Data plane of a distributed multi-task vision training job (one process per device)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the job served by a coordinator, train on one device, report, exit.
    ///
    /// The job configuration comes from the coordinator; this worker needs no job file.
    /// Exit status: 0 when the job step(s) finished, 1 on any failure.
    Run {
        /// The coordinator's URL.
        #[arg(long, env = "MTL_COORDINATOR", default_value = "http://127.0.0.1:50051")]
        coordinator: String,
        /// The job token (must match `job.token` of the coordinator's job).
        #[arg(long, env = "MTL_JOB_TOKEN", default_value = "")]
        token: String,
        /// Stable worker id; ranks are assigned in the order of ids. Default: <host>-<device>.
        #[arg(long, env = "MTL_WORKER_ID")]
        worker_id: Option<String>,
        /// Device to train on: `cpu` or `cuda:N`.
        #[arg(long, env = "MTL_DEVICE", default_value = "cpu")]
        device: String,
    },
    /// One rank of a CPU ring all-reduce benchmark; start one process per rank.
    ///
    /// Rank 0 prints a JSON line per size: seconds per all-reduce, algorithm and bus bandwidth.
    CollectiveBench {
        /// This process's rank.
        #[arg(long)]
        rank: usize,
        /// Comma-separated host:port of every rank, in rank order; this rank listens on its own.
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<std::net::SocketAddr>,
        /// Comma-separated message sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "4,16,64,256")]
        sizes_mib: Vec<usize>,
        /// Timed all-reduces per size.
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        /// A transfer that makes no progress for this long fails.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = match cli.command {
        Command::Run { coordinator, token, worker_id, device } => {
            let host = hostname();
            let worker_id = worker_id.unwrap_or_else(|| format!("{host}-{device}"));
            let identity =
                Identity { worker_id, host, device, peer_addr: String::new(), nccl_unique_id: Vec::new() };
            runtime.block_on(mtl_worker::run(RunConfig { coordinator, token, identity }))
        }
        Command::CollectiveBench { rank, peers, sizes_mib, iterations, timeout_ms } => {
            if rank >= peers.len() {
                eprintln!("error: --rank {rank} is outside the {} peers given", peers.len());
                return ExitCode::from(2);
            }
            let cfg = bench::BenchConfig {
                rank,
                peers,
                sizes_bytes: sizes_mib.iter().map(|m| m << 20).collect(),
                iterations,
                timeout: std::time::Duration::from_millis(timeout_ms),
            };
            bench::run(&cfg).map_err(mtl_worker::WorkerError::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
