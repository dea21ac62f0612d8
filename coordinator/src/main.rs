//! `coordinator`: serve a training job, or print the status of a running one.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mtl_coordinator::{JobConfig, JobOutcome};
use mtl_job::{JobToken, TOKEN_ENV};
use mtl_proto::v1::{JobStatus, MetricsKind};

mod launch;

#[derive(Parser)]
#[command(version, about = "Control plane of a distributed multi-task vision training job")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a job config, serve it to workers until the job finishes or fails.
    ///
    /// Config layers: defaults, then the file, then MTL_SECTION__KEY environment variables,
    /// then --set flags. With --local-workers N it also starts N local workers against itself
    /// (one command for a job on one machine, as torchrun's --nproc_per_node). Exit status: 0
    /// finished, 1 failed, 2 bad config or flags, 75 stopped on request (SIGTERM or SIGINT,
    /// forwarded to local workers: the workers committed a checkpoint of their last step and
    /// left; the job is interrupted and resumes when served again), 130 stopped at once (a
    /// second signal, or workers that did not stop within `server.stop_timeout_ms`; the job
    /// resumes from its newest committed checkpoint).
    Serve {
        /// The job file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Address to listen on, overriding `server.listen` (e.g. 0.0.0.0:50051).
        #[arg(long)]
        listen: Option<String>,
        /// Override any config key: --set train.steps=100 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Write the bound address to this file once listening (for scripts using port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Read the job token from this file. Without it, MTL_JOB_TOKEN, then `job.token`;
        /// with none, the coordinator generates one into `token` next to the state database.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        local: launch::LocalArgs,
    },
    /// Print a running job's state, workers and latest metrics.
    Status {
        /// The coordinator's address, e.g. http://127.0.0.1:50051 (https:// with TLS).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Read the job token from this file (else MTL_JOB_TOKEN).
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// The job token; other users of this machine see it (`ps`): prefer --token-file or
        /// MTL_JOB_TOKEN.
        #[arg(long)]
        token: Option<String>,
        #[command(flatten)]
        tls: TlsFlags,
    },
}

/// How to reach an `https://` coordinator.
#[derive(clap::Args)]
struct TlsFlags {
    /// The CA certificate (PEM) that signed the coordinator's; default: the system's roots.
    #[arg(long, env = "MTL_CA")]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator with `server.tls_client_ca`.
    #[arg(long, env = "MTL_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, env = "MTL_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

impl From<TlsFlags> for mtl_proto::client::ClientTls {
    fn from(f: TlsFlags) -> Self {
        Self { ca: f.ca, cert: f.client_cert, key: f.client_key }
    }
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
    match cli.command {
        Command::Serve { config, listen, mut overrides, addr_file, token_file, local } => {
            if let Some(listen) = listen {
                overrides.push(format!("server.listen={listen}"));
            }
            let loaded = JobConfig::load(Some(&config), &overrides, std::env::vars()).and_then(|mut cfg| {
                if let Some(token) =
                    JobToken::given(token_file.as_deref(), None, std::env::var(TOKEN_ENV).ok())?
                {
                    cfg.job.token = token;
                }
                Ok(cfg)
            });
            let cfg = match loaded {
                Ok(cfg) => cfg,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            // The TLS files are read before the bind: a bad one is a config error too.
            if let Err(err) = mtl_coordinator::check_tls(&cfg.server) {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
            let local = match local.plan(&cfg) {
                Ok(plan) => plan,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(serve(cfg, addr_file, local)) {
                Ok(JobOutcome::Finished) => ExitCode::SUCCESS,
                Ok(JobOutcome::Failed(reason)) => {
                    eprintln!("error: job failed: {reason}");
                    ExitCode::from(1)
                }
                Ok(JobOutcome::Stopped { .. }) => ExitCode::from(mtl_coordinator::EXIT_STOPPED),
                Ok(JobOutcome::Interrupted) => ExitCode::from(130),
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Status { addr, token_file, token, tls } => {
            let token = match JobToken::for_client(token_file.as_deref(), token, |m| tracing::warn!("{m}")) {
                Ok(token) => token,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(mtl_coordinator::status::fetch(&addr, token.expose(), &tls.into())) {
                Ok(status) => {
                    print!("{}", mtl_coordinator::status::render(&status));
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn serve(
    mut cfg: JobConfig,
    addr_file: Option<PathBuf>,
    local: Option<launch::Plan>,
) -> anyhow::Result<JobOutcome> {
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .with_context(|| format!("cannot listen on server.listen = {}", cfg.server.listen))?;
    // Before the address file: a script that waits for it finds the token file too.
    mtl_coordinator::ensure_token(&mut cfg)?;
    let addr = listener.local_addr()?;
    if let Some(path) = addr_file {
        std::fs::write(&path, addr.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    let signals = launch::Signals::new().context("cannot handle SIGINT and SIGTERM")?;
    let workers = match &local {
        Some(plan) => {
            Some(launch::LocalWorkers::start(plan, addr, &cfg.job.token, !cfg.server.tls_cert.is_empty())?)
        }
        None => None,
    };
    let (stop, at_once) = signals.relay(workers.as_ref());
    let report = mtl_coordinator::run_with_stop(cfg, listener, stop, at_once).await;
    if let Some(workers) = workers {
        // Their output first, then the summary; none outlives this function.
        workers.finish(report.is_err()).await;
    }
    let report = report?;
    print!("{}", mtl_coordinator::status::render(&report.status));
    print!("{}", render_learning(&report.status));
    Ok(report.outcome)
}

/// The first and the last merged evaluation side by side, one row per metric, grouped by task:
/// what training changed. Empty unless the job evaluated at least twice.
fn render_learning(status: &JobStatus) -> String {
    const ROWS: [(&str, &[&str]); 3] = [
        ("classification", &["accuracy", "F1"]),
        ("detection", &["AP", "AP50", "AP75"]),
        ("segmentation", &["mIoU", "pixel_accuracy"]),
    ];
    let mut evals = status.history.iter().filter(|p| p.kind == MetricsKind::Eval as i32);
    let (Some(first), Some(last)) = (evals.next(), evals.next_back()) else { return String::new() };
    let mut out = format!(
        "validation metrics, all ranks merged:\n  {:<15} {:<15} {:>12} {:>12}\n",
        "task",
        "metric",
        if first.step == 0 { "untrained".to_string() } else { format!("step {}", first.step) },
        format!("step {}", last.step),
    );
    for (task, keys) in ROWS {
        for key in keys {
            if let (Some(a), Some(b)) = (first.values.get(*key), last.values.get(*key)) {
                out.push_str(&format!("  {task:<15} {key:<15} {a:>12.4} {b:>12.4}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use mtl_proto::v1::{JobStatus, MetricPoint, MetricsKind};

    fn point(kind: MetricsKind, step: u64, values: &[(&str, f64)]) -> MetricPoint {
        MetricPoint {
            kind: kind as i32,
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn learning_table_puts_the_untrained_and_the_last_evaluation_side_by_side() {
        let mut status = JobStatus {
            history: vec![
                point(MetricsKind::Eval, 0, &[("accuracy", 0.2), ("mIoU", 0.05), ("AP50", 0.0)]),
                point(MetricsKind::Train, 10, &[("accuracy", 9.0)]),
                point(MetricsKind::Eval, 10, &[("accuracy", 0.5), ("mIoU", 0.3), ("AP50", 0.4)]),
                point(MetricsKind::Eval, 20, &[("accuracy", 0.75), ("mIoU", 0.55), ("AP50", 0.625)]),
            ],
            ..Default::default()
        };
        let table = super::render_learning(&status);
        let lines: Vec<&str> = table.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            [
                "validation metrics, all ranks merged:",
                "  task            metric             untrained      step 20",
                "  classification  accuracy              0.2000       0.7500",
                "  detection       AP50                  0.0000       0.6250",
                "  segmentation    mIoU                  0.0500       0.5500",
            ]
        );
        status.history.truncate(2);
        assert_eq!(super::render_learning(&status), "", "one evaluation: nothing to compare");
    }
}
