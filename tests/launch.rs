//! `coordinator serve --local-workers N`: one command starts the coordinator and N workers on
//! this machine. Launcher and workers are real processes on loopback; the launcher finds the
//! `worker` binary next to its own.
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{bin, job, tiny_data};
use mtl_job::JobToken;

/// One test at a time: each runs training processes on a small machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A job of two CPU workers without a token (the coordinator generates one) whose every file
/// goes under `root`, written to `root/job.toml`.
fn job_file(root: &Path, train: &str) -> std::path::PathBuf {
    let mut cfg =
        job(&format!("{}[rendezvous]\nmin_workers = 2\n{train}", tiny_data(&root.join("data"), 48)));
    cfg.job.token = JobToken::default();
    cfg.server.metrics_file = root.join("metrics.jsonl").display().to_string();
    cfg.server.state_db = root.join("state.db").display().to_string();
    cfg.checkpoint.dir = root.join("checkpoints").display().to_string();
    let file = root.join("job.toml");
    std::fs::write(&file, cfg.to_toml()).unwrap();
    file
}

/// `coordinator serve --config FILE ARGS`, output captured, workers at one thread each.
fn launch(root: &Path, file: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["serve", "--config", file.to_str().unwrap()])
        .args(args)
        .env_remove("MTL_JOB_TOKEN")
        .env_remove("MTL_WORKER_BIN")
        .env("OMP_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn two_local_workers_run_a_job_to_its_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file =
        job_file(root, "[train]\nsteps = 4\nbatch_size = 4\nlog_every_steps = 1\neval_every_steps = 2\n");
    let out = launch(root, &file, &["--local-workers", "2", "--local-device", "cpu"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for i in 0..2 {
        let prefix = format!("[worker {i}] ");
        assert!(
            stderr.lines().any(|l| l.starts_with(&prefix) && l.contains("joined")),
            "{prefix}:\n{stderr}"
        );
        assert!(stdout.contains(&format!("local-{i}")), "stable worker ids in the summary:\n{stdout}");
    }
    assert!(stdout.contains("validation metrics"), "the final metrics:\n{stdout}");
    // Every worker's output came through before the summary.
    let lines: Vec<&str> = stdout.lines().collect();
    let last_worker_line = lines.iter().rposition(|l| l.starts_with("[worker"));
    let summary = lines.iter().position(|l| l.contains("validation metrics")).unwrap();
    assert!(last_worker_line.is_none_or(|l| l < summary), "{stdout}");
}

/// The pid in a `local worker started ... pid=N` log line.
fn started_pid(line: &str) -> Option<u32> {
    if !line.contains("local worker started") {
        return None;
    }
    line.split_whitespace().find_map(|w| w.strip_prefix("pid=")).and_then(|p| p.parse().ok())
}

/// A launcher that a failing test does not leave behind.
struct Launcher(Child);

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `child`'s stderr lines into a channel, on a thread; drains its stdout on another.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    rx
}

/// A job too long to end by itself, launched with two CPU workers.
fn start_long_job(root: &Path) -> (Launcher, mpsc::Receiver<String>) {
    let file = job_file(root, "[train]\nsteps = 100000\nbatch_size = 4\nlog_every_steps = 1\n");
    let mut launcher =
        launch(root, &file, &["--local-workers", "2", "--local-device", "cpu"]).spawn().unwrap();
    let rx = lines(&mut launcher);
    (Launcher(launcher), rx)
}

/// Waits until both workers have joined the job (it is mid-run); returns their pids and the
/// lines read so far.
fn joined(rx: &mpsc::Receiver<String>) -> (Vec<u32>, Vec<String>) {
    let (mut pids, mut joined, mut seen) = (Vec::new(), [false; 2], Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while joined.iter().any(|j| !j) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the workers did not join:\n{}", seen.join("\n")));
        pids.extend(started_pid(&line));
        for (i, j) in joined.iter_mut().enumerate() {
            *j |= line.starts_with(&format!("[worker {i}] ")) && line.contains("joined");
        }
        seen.push(line);
    }
    assert_eq!(pids.len(), 2, "{}", seen.join("\n"));
    (pids, seen)
}

/// Whether process `pid` still runs (a zombie waiting for its reaper does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[test]
fn sigterm_stops_the_job_with_a_checkpoint_and_leaves_no_worker_alive() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (mut launcher, rx) = start_long_job(root);
    let (pids, seen) = joined(&rx);
    // The generated token reached them through the environment, not their command line.
    let token = std::fs::read_to_string(root.join("token")).unwrap();
    for pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(cmdline.contains("local-") && !cmdline.contains(token.trim()), "{cmdline}");
    }

    let kill = Command::new("kill").args(["-TERM", &launcher.0.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = launcher.0.wait().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    // Forwarded, the signal stops the workers after their step with a committed checkpoint
    // (docs/DURABILITY.md): the job's status is "stopped on request".
    assert_eq!(status.code(), Some(75), "stopped:\n{}\n{}", seen.join("\n"), rest.join("\n"));
    assert!(
        rest.iter().any(|l| l.contains("outcome=Stopped { checkpoint_step: Some(")),
        "a checkpoint of the last step:\n{}",
        rest.join("\n")
    );
    for i in 0..2 {
        let (sent, exited) =
            (format!("worker={i} signal=SIGTERM"), format!("local worker exited worker={i}"));
        assert!(
            rest.iter().any(|l| l.contains("signal sent to local worker") && l.contains(&sent)),
            "{sent}:\n{}",
            rest.join("\n")
        );
        assert!(rest.iter().any(|l| l.contains(&exited)), "{exited}:\n{}", rest.join("\n"));
    }
    // The launcher reaped its workers before it exited: they are gone from the process table.
    for pid in &pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "worker {pid} outlived the launcher");
    }
}

#[test]
fn a_killed_launcher_takes_its_workers_with_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Real workers also stop soon after by themselves (their coordinator and their pipes are
    // gone); a worker that only sleeps shows that the kernel kills them (PR_SET_PDEATHSIG).
    let sleeper = root.join("sleeping-worker");
    std::fs::write(&sleeper, "#!/bin/sh\necho up >&2\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&sleeper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let file = job_file(root, "[train]\nsteps = 4\n");
    let args = ["--local-workers", "2", "--local-device", "cpu", "--worker-bin", sleeper.to_str().unwrap()];
    let mut launcher = Launcher(launch(root, &file, &args).spawn().unwrap());
    let rx = lines(&mut launcher.0);
    let (mut pids, mut up, mut seen) = (Vec::new(), 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while up < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no workers:\n{}", seen.join("\n")));
        pids.extend(started_pid(&line));
        up += usize::from(line.starts_with("[worker") && line.ends_with("] up"));
        seen.push(line);
    }
    assert_eq!(pids.len(), 2, "{}", seen.join("\n"));
    launcher.0.kill().unwrap(); // SIGKILL: no code of the launcher runs
    launcher.0.wait().unwrap();
    // Whoever inherits them reaps them; a zombie does not run.
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        while running(pid) {
            assert!(Instant::now() < deadline, "worker {pid} outlived the killed launcher");
            std::thread::sleep(Duration::from_millis(20)); // polling the process table, not syncing
        }
    }
}

#[test]
fn sigterm_stops_a_plain_serve_waiting_for_workers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file = job_file(root, "[train]\nsteps = 4\n");
    let addr = root.join("addr");
    let mut serve = Launcher(launch(root, &file, &["--addr-file", addr.to_str().unwrap()]).spawn().unwrap());
    let rx = lines(&mut serve.0);
    common::bound_address(&addr);
    let kill = Command::new("kill").args(["-TERM", &serve.0.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = serve.0.wait().unwrap();
    // No generation trains: nothing to checkpoint, the job is stopped and resumable at once.
    assert_eq!(status.code(), Some(75), "{}", rx.iter().collect::<Vec<_>>().join("\n"));
}

#[test]
fn bad_local_worker_flags_fail_with_status_2_before_anything_starts() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let file = job_file(root, "[train]\nsteps = 4\n");
    let addr = root.join("addr");
    let addr_arg = ["--addr-file", addr.to_str().unwrap()];
    let missing = root.join("no-such-dir").join("worker");

    let by_flag =
        ["--local-workers", "2", "--local-device", "cpu", "--worker-bin", missing.to_str().unwrap()];
    let by_env = launch(root, &file, &["--local-workers", "2", "--local-device", "cpu"])
        .args(addr_arg)
        .env("MTL_WORKER_BIN", &missing)
        .output()
        .unwrap();
    for out in [launch(root, &file, &by_flag).args(addr_arg).output().unwrap(), by_env] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&missing.display().to_string()) && stderr.contains("--worker-bin"),
            "{stderr}"
        );
    }
    let too_few = launch(root, &file, &["--local-workers", "1", "--local-device", "cpu"])
        .args(addr_arg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&too_few.stderr);
    assert_eq!(too_few.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("rendezvous.min_workers = 2"), "{stderr}");

    assert!(
        !addr.exists() && !root.join("state.db").exists() && !root.join("token").exists(),
        "nothing started"
    );
}
