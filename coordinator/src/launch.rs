//! `coordinator serve --local-workers N`: one command for a job on one machine, like torchrun's
//! `--nproc_per_node`. The coordinator serves as usual and starts N `worker run` processes
//! against its own listener, one per GPU (`cuda:i`) or N on the CPU. The token reaches them
//! in their environment, never on a command line; their output comes back line by line,
//! prefixed `[worker i] `. SIGINT and SIGTERM go to them as they came (a worker's own handling
//! of a signal, such as a checkpoint on preemption, is the worker's business), and no worker
//! outlives the launcher: they are reaped on every exit path, and the kernel kills them if the
//! launcher itself is killed (`PR_SET_PDEATHSIG`). A worker that dies is the job's fault
//! tolerance's to handle; here its exit is only logged.
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mtl_job::{JobConfig, JobToken, TOKEN_ENV};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

/// How long workers get to exit by themselves (after the job ended, or after a forwarded
/// signal) before they are killed. A second signal cuts it short.
const GRACE: Duration = Duration::from_secs(10);

/// The `serve` flags that start local workers.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct LocalArgs {
    /// Also start this many `worker run` processes on this machine against this coordinator
    /// (a number, or `auto`: one per visible GPU). Their output is passed through, prefixed
    /// `[worker i]`; SIGINT and SIGTERM are forwarded to them.
    #[arg(long, value_name = "N|auto", value_parser = parse_count)]
    local_workers: Option<Count>,
    /// Device of the local workers: `cuda` (worker i trains on `cuda:i`) or `cpu`. Default:
    /// `cuda` when a GPU is visible (CUDA_VISIBLE_DEVICES, /proc/driver/nvidia/gpus), else `cpu`.
    #[arg(long, value_name = "cpu|cuda", value_parser = parse_device, requires = "local_workers")]
    local_device: Option<Device>,
    /// The `worker` binary for --local-workers. Default: `worker` next to this executable.
    #[arg(long, env = "MTL_WORKER_BIN", value_name = "PATH")]
    worker_bin: Option<PathBuf>,
}

/// `--local-workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    /// One per visible GPU.
    Auto,
    /// This many (at least 1).
    Exactly(usize),
}

/// `--local-device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda,
}

fn parse_count(text: &str) -> Result<Count, String> {
    match text {
        "auto" => Ok(Count::Auto),
        _ => match text.parse::<usize>() {
            Ok(0) => Err("at least 1 worker".into()),
            Ok(n) => Ok(Count::Exactly(n)),
            Err(_) => Err(format!("`{text}` is neither a number nor `auto`")),
        },
    }
}

fn parse_device(text: &str) -> Result<Device, String> {
    match text {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda),
        _ => Err(format!("`{text}` is not `cpu` or `cuda` (worker i gets `cuda:i`)")),
    }
}

/// What `--local-workers` resolved to: which binary, how many, on what, with how many threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    worker_bin: PathBuf,
    /// One `--device` per worker.
    devices: Vec<String>,
    /// `OMP_NUM_THREADS` for each worker, unless the user set it.
    omp_threads: Option<usize>,
}

impl LocalArgs {
    /// The plan for `cfg` on this machine; `None` without `--local-workers`. Every error
    /// names the flag or key at fault, and comes before anything starts.
    pub(crate) fn plan(&self, cfg: &JobConfig) -> Result<Option<Plan>, String> {
        let Some(count) = self.local_workers else { return Ok(None) };
        let worker_bin = match &self.worker_bin {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(|err| format!("cannot find this executable to look for `worker` next to it: {err}"))?
                .with_file_name("worker"),
        };
        check_binary(&worker_bin)?;
        let gpus = visible_gpus(
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
            std::fs::read_dir("/proc/driver/nvidia/gpus").ok().map(Iterator::count),
        );
        let (n, device) = select(count, self.local_device, gpus)?;
        let (min, max) = (cfg.rendezvous.min_workers as usize, cfg.rendezvous.max_workers() as usize);
        if n < min {
            return Err(format!(
                "--local-workers {n} is fewer than rendezvous.min_workers = {min}: the job would never start"
            ));
        }
        if n > max {
            return Err(format!(
                "--local-workers {n} is more than rendezvous.max_workers = {max}: the others would never be admitted"
            ));
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let user_threads = std::env::var_os("OMP_NUM_THREADS").is_some();
        Ok(Some(Plan {
            worker_bin,
            devices: (0..n)
                .map(|i| match device {
                    Device::Cpu => "cpu".to_string(),
                    Device::Cuda => format!("cuda:{i}"),
                })
                .collect(),
            omp_threads: omp_threads(device, n, cores, user_threads),
        }))
    }
}

fn check_binary(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("the worker binary {} is not an executable file", path.display())),
        Err(err) => Err(format!(
            "the worker binary {} is missing ({err}): build it (cargo build --bins), or give its path \
             with --worker-bin or MTL_WORKER_BIN",
            path.display()
        )),
    }
}

/// GPUs a worker can see: the entries of `CUDA_VISIBLE_DEVICES` up to the first invalid one
/// (as CUDA reads it: empty or `-1` hides every GPU), at most as many as the driver lists;
/// without it, the driver's count. The coordinator does not link CUDA, so this is all it knows.
fn visible_gpus(cuda_visible_devices: Option<&str>, driver_gpus: Option<usize>) -> usize {
    let listed = cuda_visible_devices.map(|list| {
        list.split(',').map(str::trim).take_while(|d| !d.is_empty() && !d.starts_with('-')).count()
    });
    match (listed, driver_gpus) {
        (Some(listed), Some(driver)) => listed.min(driver),
        (Some(n), None) | (None, Some(n)) => n,
        (None, None) => 0,
    }
}

/// How many workers on which device, given `gpus` visible GPUs.
fn select(count: Count, device: Option<Device>, gpus: usize) -> Result<(usize, Device), String> {
    let device = device.unwrap_or(if gpus > 0 { Device::Cuda } else { Device::Cpu });
    match (device, count) {
        (Device::Cuda, _) if gpus == 0 => {
            Err("--local-device cuda, but no GPU is visible (CUDA_VISIBLE_DEVICES, /proc/driver/nvidia/gpus)"
                .into())
        }
        (Device::Cuda, Count::Auto) => Ok((gpus, device)),
        (Device::Cuda, Count::Exactly(n)) if n > gpus => Err(format!(
            "--local-workers {n} on cuda, but {gpus} GPU(s) are visible: one worker per GPU \
             (or --local-device cpu)"
        )),
        (Device::Cpu, Count::Auto) => Err(
            "--local-workers auto means one worker per GPU, and the workers run on the CPU: give a number"
                .into(),
        ),
        (_, Count::Exactly(n)) => Ok((n, device)),
    }
}

/// CPU workers share the cores: `cores / n` LibTorch threads each (at least one), instead of
/// each starting a thread per core, unless the user set `OMP_NUM_THREADS`.
fn omp_threads(device: Device, n: usize, cores: usize, user_set: bool) -> Option<usize> {
    (device == Device::Cpu && !user_set).then(|| (cores / n).max(1))
}

/// SIGINT and SIGTERM, both meaning "stop" to `serve`.
pub(crate) struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    /// Takes over SIGINT and SIGTERM (inside the runtime).
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
    }

    /// The next one to arrive, as its number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
        }
    }

    /// Relays the signals: the first resolves `stop` with its name, the second `at_once`; each
    /// is forwarded to the local `workers` first (the first makes them stop after their step
    /// with a checkpoint, the second at once).
    pub(crate) fn relay(
        mut self,
        workers: Option<&LocalWorkers>,
    ) -> (impl Future<Output = &'static str> + Send, impl Future<Output = ()> + Send) {
        let forward = workers.map(|w| w.signal_tx.clone());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (at_once_tx, at_once_rx) = oneshot::channel();
        tokio::spawn(async move {
            let send = |signal: i32| {
                if let Some(forward) = &forward {
                    let _ = forward.send(signal);
                }
            };
            let signal = self.recv().await;
            tracing::warn!(signal = %signal_name(signal), "stop requested (signal again to stop at once)");
            send(signal);
            let _ = stop_tx.send(signal_name(signal));
            let signal = self.recv().await;
            tracing::warn!(signal = %signal_name(signal), "second signal: stopping at once");
            send(signal);
            let _ = at_once_tx.send(());
        });
        let stop = async move { stop_rx.await.unwrap_or("shutdown") };
        let at_once = async move {
            if at_once_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        (stop, at_once)
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => "signal",
    }
}

/// The running local workers. Each has a task that owns its process, passes its output
/// through, delivers the signals sent to it and reaps it.
pub(crate) struct LocalWorkers {
    signal_tx: broadcast::Sender<i32>,
    exited_rx: watch::Receiver<usize>,
    tasks: Vec<JoinHandle<()>>,
}

impl LocalWorkers {
    /// Starts the plan's workers against the coordinator listening on `addr` (over `https://`
    /// when it serves TLS: the workers take `MTL_CA` and the client certificate from the
    /// environment they inherit).
    pub(crate) fn start(plan: &Plan, addr: SocketAddr, token: &JobToken, tls: bool) -> std::io::Result<Self> {
        let mut addr = addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let url = format!("{}://{addr}", if tls { "https" } else { "http" });
        let (signal_tx, _) = broadcast::channel(8);
        let (exited_tx, exited_rx) = watch::channel(0);
        let mut workers = Self { signal_tx, exited_rx, tasks: Vec::new() };
        // SAFETY: async-signal-safe calls only (prctl, getppid, _exit) between fork and exec.
        let launcher = unsafe { libc::getpid() };
        for (i, device) in plan.devices.iter().enumerate() {
            let mut cmd = tokio::process::Command::new(&plan.worker_bin);
            cmd.args([
                "run",
                "--coordinator",
                &url,
                "--worker-id",
                &format!("local-{i}"),
                "--device",
                device,
            ])
            .env(TOKEN_ENV, token.expose())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal reaches it once, forwarded.
            .process_group(0)
            .kill_on_drop(true);
            if let Some(threads) = plan.omp_threads {
                cmd.env("OMP_NUM_THREADS", threads.to_string());
            }
            // SAFETY: see above. The death signal is tied to the thread that forks: this runs
            // on the thread that drives `serve`, which lives as long as the process.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::getppid() != launcher {
                        // The launcher died before the death signal was armed.
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
            let child = match cmd.spawn() {
                Ok(child) => child,
                Err(err) => {
                    workers.send(libc::SIGKILL);
                    return Err(std::io::Error::new(
                        err.kind(),
                        format!("cannot start {}: {err}", plan.worker_bin.display()),
                    ));
                }
            };
            tracing::info!(worker = i, pid = child.id(), device = %device, omp_threads = plan.omp_threads, url = %url, "local worker started");
            let task = supervise(i, child, workers.signal_tx.subscribe(), exited_tx.clone());
            workers.tasks.push(tokio::spawn(task));
        }
        Ok(workers)
    }

    fn send(&self, signal: i32) {
        let _ = self.signal_tx.send(signal);
    }

    /// After the coordinator stopped: gives the workers [`GRACE`] (none when `now`) to exit,
    /// kills those left, reaps them all and passes the rest of their output through.
    pub(crate) async fn finish(self, now: bool) {
        if !now {
            let mut exited_rx = self.exited_rx.clone();
            let all = self.tasks.len();
            tokio::select! {
                _ = exited_rx.wait_for(|n| *n == all) => {}
                _ = tokio::time::sleep(GRACE) => {
                    tracing::warn!(grace_s = GRACE.as_secs(), "local workers still running; killing them");
                }
            }
        }
        self.send(libc::SIGKILL);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Worker `i`'s life: its output passed through, signals delivered, its exit reaped and logged.
async fn supervise(
    i: usize,
    mut child: tokio::process::Child,
    mut signal_rx: broadcast::Receiver<i32>,
    exited_tx: watch::Sender<usize>,
) {
    let prefix = format!("[worker {i}] ");
    let stdout = child.stdout.take().map(|out| tokio::spawn(pass_through(out, prefix.clone(), false)));
    let stderr = child.stderr.take().map(|err| tokio::spawn(pass_through(err, prefix, true)));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            signal = signal_rx.recv() => {
                // `id` is `None` once reaped: a signal never reaches a recycled pid.
                if let (Ok(signal), Some(pid)) = (signal, child.id()) {
                    // SAFETY: kill(2) on our own unreaped child.
                    if unsafe { libc::kill(pid as libc::pid_t, signal) } == 0 {
                        tracing::info!(worker = i, signal = %signal_name(signal), "signal sent to local worker");
                    }
                }
            }
        }
    };
    for pipe in [stdout, stderr].into_iter().flatten() {
        let _ = pipe.await;
    }
    match status {
        Ok(status) if status.success() => tracing::info!(worker = i, "local worker exited"),
        Ok(status) => tracing::warn!(worker = i, %status, "local worker exited"),
        Err(err) => tracing::error!(worker = i, %err, "cannot wait for local worker"),
    }
    exited_tx.send_modify(|n| *n += 1);
}

/// Copies `pipe` to this process's stdout or stderr, each line prefixed.
async fn pass_through(pipe: impl AsyncRead + Unpin, prefix: String, to_stderr: bool) {
    use std::io::Write;
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let mut out = Vec::with_capacity(prefix.len() + line.len());
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(&line);
        // A closed terminal or pipe is no reason to stop reading (the worker would block).
        let _ = if to_stderr {
            std::io::stderr().lock().write_all(&out)
        } else {
            std::io::stdout().lock().write_all(&out)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::{omp_threads, parse_count, select, visible_gpus, Count, Device};

    #[test]
    fn visible_gpus_follow_cuda_visible_devices_within_what_the_driver_lists() {
        assert_eq!(visible_gpus(None, None), 0, "no driver, no GPU");
        assert_eq!(visible_gpus(None, Some(8)), 8);
        assert_eq!(visible_gpus(Some("0,1"), Some(8)), 2);
        assert_eq!(visible_gpus(Some("3, 5 ,GPU-1a2b"), None), 3, "indices and UUIDs count");
        assert_eq!(visible_gpus(Some("0,1,2"), Some(1)), 1, "at most what the driver has");
        assert_eq!(visible_gpus(Some(""), Some(8)), 0, "empty hides every GPU");
        assert_eq!(visible_gpus(Some("-1"), Some(8)), 0);
        assert_eq!(visible_gpus(Some("0,-1,1"), Some(8)), 1, "CUDA stops at the first invalid entry");
    }

    #[test]
    fn the_device_defaults_to_cuda_when_a_gpu_is_visible_and_cuda_takes_one_gpu_per_worker() {
        let n = Count::Exactly;
        assert_eq!(select(n(2), None, 0), Ok((2, Device::Cpu)));
        assert_eq!(select(n(2), None, 4), Ok((2, Device::Cuda)));
        assert_eq!(select(Count::Auto, None, 4), Ok((4, Device::Cuda)));
        assert_eq!(select(n(3), Some(Device::Cpu), 4), Ok((3, Device::Cpu)), "cpu on a GPU machine");
        assert_eq!(select(n(8), Some(Device::Cpu), 1), Ok((8, Device::Cpu)), "no cap on cpu");
        let err = select(n(5), None, 4).unwrap_err();
        assert!(err.contains("--local-workers 5") && err.contains("4 GPU"), "{err}");
        let err = select(n(1), Some(Device::Cuda), 0).unwrap_err();
        assert!(err.contains("no GPU is visible"), "{err}");
        let err = select(Count::Auto, None, 0).unwrap_err();
        assert!(err.contains("give a number"), "{err}");
    }

    #[test]
    fn cpu_workers_share_the_cores_unless_the_user_chose_threads() {
        assert_eq!(omp_threads(Device::Cpu, 2, 16, false), Some(8));
        assert_eq!(omp_threads(Device::Cpu, 3, 16, false), Some(5));
        assert_eq!(omp_threads(Device::Cpu, 4, 2, false), Some(1), "at least one");
        assert_eq!(omp_threads(Device::Cpu, 2, 16, true), None);
        assert_eq!(omp_threads(Device::Cuda, 2, 16, false), None);
    }

    #[test]
    fn the_worker_count_is_a_positive_number_or_auto() {
        assert_eq!(parse_count("auto"), Ok(Count::Auto));
        assert_eq!(parse_count("3"), Ok(Count::Exactly(3)));
        assert!(parse_count("0").is_err());
        assert!(parse_count("two").unwrap_err().contains("`two`"));
    }
}
