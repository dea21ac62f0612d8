//! `worker`: join a job served by a coordinator and train on one device.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
            let identity = Identity { worker_id, host, device, peer_addr: String::new() };
            runtime.block_on(mtl_worker::run(RunConfig { coordinator, token, identity }))
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
