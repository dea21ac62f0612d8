//! `worker`: join a job served by a coordinator and train on one device.
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mtl_job::JobToken;
use mtl_proto::client::ClientTls;
use mtl_worker::{
    BenchConfig, BenchStepOptions, Identity, RunConfig, RunOutcome, StandaloneOptions, StopRequest,
    SyntheticConfig, SyntheticPreset, WorkerError,
};

mod commands;
mod progress;

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
    /// Exit status: 0 when training finished, 1 on any failure (reported to the coordinator
    /// first), 2 without a usable job token, 75 when stopped on request (SIGTERM, SIGINT, or
    /// the coordinator stopping) after the checkpoint of the last step was committed: the job
    /// resumes from it. A second signal exits at once with 128 + its number (143, 130).
    Run {
        /// The coordinator's URL.
        #[arg(long, env = "MTL_COORDINATOR", default_value = "http://127.0.0.1:50051")]
        coordinator: String,
        /// Read the job token from this file (e.g. the `token` file a coordinator generated);
        /// without it, MTL_JOB_TOKEN.
        #[arg(long, conflicts_with = "token")]
        token_file: Option<std::path::PathBuf>,
        /// The job token; other users of this machine see it (`ps`): prefer --token-file or
        /// MTL_JOB_TOKEN.
        #[arg(long)]
        token: Option<String>,
        /// Stable worker id; ranks are assigned in the order of ids. Default: <host>-<device>.
        #[arg(long, env = "MTL_WORKER_ID")]
        worker_id: Option<String>,
        /// Device to train on: `cpu` or `cuda:N`.
        #[arg(long, env = "MTL_DEVICE", default_value = "cpu")]
        device: String,
        /// Address to listen on for peers' collective traffic, `host:port` (port 0 = any free
        /// port). The host is what peers connect to: use this node's reachable address.
        #[arg(long, env = "MTL_PEER_ADDR", default_value = "127.0.0.1:0")]
        peer_addr: String,
        /// Rank 0 writes the final checkpoint (a checkpoint directory) here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// The CA certificate (PEM) that signed an https:// coordinator's; default: the
        /// system's roots.
        #[arg(long, env = "MTL_CA")]
        ca: Option<std::path::PathBuf>,
        /// This worker's certificate (PEM), for a coordinator with `server.tls_client_ca`.
        #[arg(long, env = "MTL_CLIENT_CERT", requires = "client_key")]
        client_cert: Option<std::path::PathBuf>,
        /// The private key (PEM) of --client-cert.
        #[arg(long, env = "MTL_CLIENT_KEY", requires = "client_cert")]
        client_key: Option<std::path::PathBuf>,
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
    /// Train without a coordinator: the whole job in this process (world size 1).
    ///
    /// Evaluates the untrained model, every `train.eval_every_steps` and at the end, printing a
    /// per-task table (or one JSON object with --json). Writes checkpoints (`step-<N>/`) into
    /// `checkpoint.dir` every `checkpoint.every_steps` and at the end, keeping the newest
    /// `checkpoint.keep_last`; a run from scratch refuses a directory that already holds some.
    Train {
        /// Required: run without a coordinator (distributed training is `worker run`).
        #[arg(long, required = true)]
        standalone: bool,
        #[command(flatten)]
        job: JobArgs,
        /// Also write the final checkpoint (a checkpoint directory) here.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Continue exactly where a checkpoint left off: DIR is a checkpoint directory (its
        /// newest complete `step-<N>/` is taken; corrupt ones are skipped and logged) or one
        /// `step-<N>/`. The job must be the same (up to `[checkpoint]`, `[server]`, `[rendezvous]`).
        #[arg(long, value_name = "DIR")]
        resume: Option<std::path::PathBuf>,
        /// Stop after this step and write a checkpoint there (a planned stop; continue with --resume).
        #[arg(long, value_name = "STEP")]
        stop_at_step: Option<u64>,
        /// Print the final metrics as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Time the training step alone: batches loaded once onto the device, then `--warmup`
    /// untimed and `--steps` timed steps of the job's model (a world of one). Prints ms/step and
    /// images/s (one JSON object with --json). Compare with bench/torch_reference.py `step`.
    BenchStep {
        #[command(flatten)]
        job: JobArgs,
        /// Untimed steps first.
        #[arg(long, default_value_t = 10)]
        warmup: u64,
        /// Timed steps.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
        /// Distinct batches loaded and cycled through.
        #[arg(long, default_value_t = 4)]
        batches: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a checkpoint on its job's validation split, or score a COCO results file.
    ///
    /// Either --checkpoint DIR, or --gt COCO.json with --detections RESULTS.json (scored
    /// exactly as pycocotools' COCOeval for bbox).
    Eval {
        /// A checkpoint (`step-<N>/` or an --out directory), or a checkpoint directory (its
        /// newest complete checkpoint).
        #[arg(long, conflicts_with_all = ["gt", "detections"], required_unless_present = "gt")]
        checkpoint: Option<std::path::PathBuf>,
        /// COCO instances ground truth.
        #[arg(long, requires = "detections")]
        gt: Option<std::path::PathBuf>,
        /// COCO results (a list of {image_id, category_id, bbox, score}).
        #[arg(long, requires = "gt")]
        detections: Option<std::path::PathBuf>,
        /// Device for --checkpoint: `cpu` or `cuda:N`.
        #[arg(long, env = "MTL_DEVICE", default_value = "cpu")]
        device: String,
        /// Print one JSON object (keys as pycocotools' stats: AP, AP50, ...; mIoU; accuracy, F1).
        #[arg(long)]
        json: bool,
    },
    /// Run a checkpoint on images: detections.json (COCO results), classes.json, masks/*.png
    /// and overlays/*.png (boxes and mask drawn on the input), in the input's coordinates.
    Predict {
        /// A checkpoint (`step-<N>/` or an --out directory), or a checkpoint directory (its
        /// newest complete checkpoint).
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// A directory of PNG/JPEG images (ids in file-name order from 0), a COCO instances
        /// file (`.json`) or a JSONL manifest: files keep their image ids, so `eval --gt` can
        /// score `detections.json` against the same COCO file.
        #[arg(long)]
        input: std::path::PathBuf,
        /// Where a COCO input's `file_name`s are (default: the COCO file's directory).
        #[arg(long)]
        image_root: Option<std::path::PathBuf>,
        /// Output directory (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Device: `cpu` or `cuda:N`.
        #[arg(long, env = "MTL_DEVICE", default_value = "cpu")]
        device: String,
        /// Images per forward pass.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Overlays draw boxes scoring at least this (detections.json keeps every detection).
        #[arg(long, default_value_t = 0.3)]
        overlay_score: f64,
    },
    /// Write a checkpoint's model weights alone as one safetensors file (names as in
    /// docs/CHECKPOINTS.md), after checking the checkpoint's checksums.
    Export {
        /// A checkpoint (`step-<N>/` or an --out directory), or a checkpoint directory (its
        /// newest complete checkpoint).
        #[arg(long)]
        checkpoint: std::path::PathBuf,
        /// The file to write, e.g. `model.safetensors`.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Generate a dataset on disk.
    GenData {
        #[command(subcommand)]
        kind: GenData,
    },
}

#[derive(Subcommand)]
enum GenData {
    /// Shapes (circle, square, triangle, cross, ring) on textured backgrounds, every task
    /// labelled: PNG images and masks, train.jsonl, val.jsonl and dataset.json in --out.
    ///
    /// The class of an image is the shape class with the largest visible area. The same
    /// seed always writes the same bytes.
    Shapes {
        /// Output directory (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Number of images (train + val).
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
        n: u32,
        /// Side of the square images in pixels.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=1024))]
        size: u32,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Fraction of the images (the last ones) written to val.jsonl, in [0, 1).
        #[arg(long, default_value_t = 0.2, value_parser = parse_fraction)]
        val_fraction: f64,
        /// `standard` (1-3 overlapping shapes on textured backgrounds) or `easy` (1-2 larger
        /// shapes on plain or gradient backgrounds), as `data.synthetic_preset`.
        #[arg(long, default_value = "standard", value_parser = parse_preset)]
        preset: SyntheticPreset,
    },
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not in [0, 1)"))
    }
}

fn parse_preset(text: &str) -> Result<SyntheticPreset, String> {
    match text {
        "standard" => Ok(SyntheticPreset::Standard),
        "easy" => Ok(SyntheticPreset::Easy),
        _ => Err(format!("`{text}` is not a preset (standard or easy)")),
    }
}

/// The job a subcommand trains: its file, overrides and device.
#[derive(clap::Args)]
struct JobArgs {
    /// The job file (TOML).
    #[arg(long, short)]
    config: std::path::PathBuf,
    /// Override any config key: --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, env = "MTL_DEVICE", default_value = "cpu")]
    device: String,
}

impl JobArgs {
    /// The job file with its overrides and environment; `None` after printing why it is
    /// invalid (before any work starts).
    fn config(&self) -> Option<mtl_job::JobConfig> {
        mtl_job::JobConfig::load(Some(&self.config), &self.overrides, std::env::vars())
            .map_err(|err| eprintln!("error: {err}"))
            .ok()
    }
}

/// glibc's allocator gives every block above its mmap threshold (128 KiB at first) a mapping of
/// its own and hands freed memory at the top of a heap back to the kernel. A training step
/// frees and allocates the same activations every step, so both mean fresh pages and a page
/// fault for each of their 4 KiB, every step, and unmapping interrupts the other threads of the
/// process to flush their TLBs. Blocks up to 32 MiB now come from the heaps, which keep up to
/// 1 GiB of freed memory for reuse (docs/PERFORMANCE.md: 4x fewer page faults, a quarter less
/// CPU time per tiny-model step). Left alone when the environment tunes the allocator itself.
fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k == "GLIBC_TUNABLES" || k.starts_with("MALLOC_")
        });
        if !tuned {
            // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
            // exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory_for_reuse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| progress::StderrWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            coordinator,
            token_file,
            token,
            worker_id,
            device,
            peer_addr,
            out,
            ca,
            client_cert,
            client_key,
        } => {
            let token = match JobToken::for_client(token_file.as_deref(), token, |m| tracing::warn!("{m}")) {
                Ok(token) => token,
                Err(message) => {
                    eprintln!("error: {message}");
                    return ExitCode::from(2);
                }
            };
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            let host = hostname();
            let worker_id = worker_id.unwrap_or_else(|| format!("{host}-{device}"));
            let identity =
                Identity { worker_id, host, device, peer_addr: String::new(), nccl_unique_id: Vec::new() };
            let stop = StopRequest::new();
            let run = async {
                mtl_worker::stop_on_signals(stop.clone())
                    .map_err(|source| WorkerError::Io { path: "signal handlers".into(), source })?;
                mtl_worker::run(RunConfig {
                    coordinator,
                    tls: ClientTls { ca, cert: client_cert, key: client_key },
                    token,
                    identity,
                    peer_bind: peer_addr,
                    out,
                    stop,
                })
                .await
            };
            match runtime.block_on(run) {
                Ok(RunOutcome::Finished) => Ok(()),
                Ok(RunOutcome::Interrupted { .. }) => return ExitCode::from(mtl_worker::EXIT_INTERRUPTED),
                Err(err) => Err(err),
            }
        }
        Command::CollectiveBench { rank, peers, sizes_mib, iterations, timeout_ms } => {
            if rank >= peers.len() {
                eprintln!("error: --rank {rank} is outside the {} peers given", peers.len());
                return ExitCode::from(2);
            }
            let cfg = BenchConfig {
                rank,
                peers,
                sizes_bytes: sizes_mib.iter().map(|m| m << 20).collect(),
                iterations,
                timeout: std::time::Duration::from_millis(timeout_ms),
            };
            commands::collective_bench(&cfg)
        }
        Command::Train { standalone: _, job, out, resume, stop_at_step, json } => {
            let Some(cfg) = job.config() else { return ExitCode::from(2) };
            let opts = StandaloneOptions { out, resume, stop_at_step };
            mtl_worker::parse_device(&job.device)
                .and_then(|d| commands::train_standalone(&cfg, d, &opts, json))
        }
        Command::BenchStep { job, warmup, steps, batches, json } => {
            let Some(cfg) = job.config() else { return ExitCode::from(2) };
            let opts = BenchStepOptions { warmup, steps, batches };
            mtl_worker::parse_device(&job.device).and_then(|d| commands::bench_step(&cfg, d, &opts, json))
        }
        Command::Eval { checkpoint, gt, detections, device, json } => match (checkpoint, gt, detections) {
            (Some(dir), _, _) => {
                mtl_worker::parse_device(&device).and_then(|d| commands::eval_checkpoint(&dir, d, json))
            }
            (None, Some(gt), Some(dets)) => commands::eval_files(&gt, &dets, json),
            _ => unreachable!("clap requires --checkpoint or --gt with --detections"),
        },
        Command::Predict { checkpoint, input, image_root, out, device, batch_size, overlay_score } => {
            mtl_worker::parse_device(&device).and_then(|d| {
                commands::predict(
                    &checkpoint,
                    &input,
                    image_root.as_deref(),
                    &out,
                    d,
                    batch_size,
                    overlay_score,
                )
            })
        }
        Command::Export { checkpoint, out } => commands::export(&checkpoint, &out),
        Command::GenData { kind: GenData::Shapes { out, n, size, seed, val_fraction, preset } } => {
            commands::gen_shapes(&out, &SyntheticConfig { n, size, seed, val_fraction, preset })
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
