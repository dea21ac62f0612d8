//! The job token is a secret: a run writes it nowhere (checkpoints, metrics, state database,
//! logs, `coordinator status`), and a job given none gets a generated one in a private file
//! that its workers read, while other tokens are refused. Coordinator and workers run as
//! processes, with the token given the ways a user gives it.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{bin, bound_address, job, tiny_data};
use mtl_coordinator::JobConfig;
use mtl_job::JobToken;

/// One test at a time: each runs training processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A job without a token whose every file goes under `root`.
fn config(root: &Path, body: &str) -> JobConfig {
    let mut cfg = job(&format!("{}{body}", tiny_data(&root.join("data"), 48)));
    cfg.job.token = JobToken::default();
    cfg.server.metrics_file = root.join("metrics.jsonl").display().to_string();
    cfg.server.state_db = root.join("state.db").display().to_string();
    cfg.checkpoint.dir = root.join("checkpoints").display().to_string();
    cfg
}

/// `coordinator serve` on `cfg` with `env` (and no inherited `MTL_JOB_TOKEN`), working in
/// `root`, logging at debug level; returns it and its URL once it listens.
fn serve(root: &Path, cfg: &JobConfig, env: &[(&str, &str)]) -> (Child, String) {
    let file = root.join("job.toml");
    std::fs::write(&file, cfg.to_toml()).unwrap();
    let addr_file = root.join("addr");
    let child = Command::new(bin("coordinator"))
        .args(["serve", "--config", file.to_str().unwrap(), "--addr-file", addr_file.to_str().unwrap()])
        .env_remove("MTL_JOB_TOKEN")
        .envs(env.iter().copied())
        .env("RUST_LOG", "debug")
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://{}", bound_address(&addr_file));
    (child, url)
}

/// `binary args` with `env` (and no inherited `MTL_JOB_TOKEN`), working in `root`.
fn command(binary: &str, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin(binary));
    cmd.args(args)
        .env_remove("MTL_JOB_TOKEN")
        .envs(env.iter().copied())
        .env("RUST_LOG", "debug")
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `worker run` as `worker_id` against `url`.
fn worker(url: &str, root: &Path, worker_id: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut run = vec!["run", "--coordinator", url, "--worker-id", worker_id, "--device", "cpu"];
    run.extend_from_slice(args);
    command("worker", root, &run, env).spawn().unwrap()
}

/// Waits for a child off the async runtime, reading its output from the start: a process
/// logging at debug level fills a pipe nobody reads (64 KiB) and blocks in its next write, the
/// coordinator while holding its job state. A plain thread: a test that fails before awaiting
/// it does not then wait for the process at the runtime's shutdown.
fn finish(child: Child) -> tokio::sync::oneshot::Receiver<Output> {
    let (output_tx, output_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = output_tx.send(child.wait_with_output().unwrap());
    });
    output_rx
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every file under `root` whose bytes contain `needle`.
fn files_containing(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle) {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_writes_its_token_nowhere() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let token = format!("s3cret-{}-{nanos:x}", std::process::id());
    let cfg = config(
        root,
        "[rendezvous]\nmin_workers = 2\n[train]\nsteps = 4\nbatch_size = 4\nlog_every_steps = 1\n\
         eval_every_steps = 2\n[checkpoint]\nevery_steps = 2\n",
    );
    let env = [("MTL_JOB_TOKEN", token.as_str())];
    let (coordinator, url) = serve(root, &cfg, &env);
    let coordinator = finish(coordinator);
    let status = command("coordinator", root, &["status", "--addr", &url], &env).output().unwrap();
    assert!(status.status.success(), "{}", stderr(&status));
    let out = root.join("model");
    let workers: Vec<_> = (0..2)
        .map(|i| finish(worker(&url, root, &format!("w{i}"), &["--out", out.to_str().unwrap()], &env)))
        .collect();
    let mut logs = vec![("status", status)];
    for (i, w) in workers.into_iter().enumerate() {
        let output = w.await.unwrap();
        assert!(output.status.success(), "worker {i}:\n{}", stderr(&output));
        logs.push((["w0", "w1"][i], output));
    }
    let coordinator = coordinator.await.unwrap();
    assert!(coordinator.status.success(), "{}", stderr(&coordinator));

    // The run did what is under test: checkpoints, an evaluation, a final model.
    assert!(root.join("checkpoints").join("step-2").join("job.toml").is_file());
    assert!(out.join("job.toml").is_file());
    assert!(String::from_utf8_lossy(&coordinator.stdout).contains("validation metrics"));
    assert!(!root.join("token").exists(), "a given token is not written down");

    // Every byte it wrote and printed; the control file proves the search finds the token.
    logs.push(("coordinator", coordinator));
    for (name, output) in &logs {
        std::fs::write(root.join(format!("{name}.stdout")), &output.stdout).unwrap();
        std::fs::write(root.join(format!("{name}.stderr")), &output.stderr).unwrap();
    }
    std::fs::write(root.join("control"), format!("({token})")).unwrap();
    assert_eq!(files_containing(root, token.as_bytes()), [root.join("control")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_given_no_token_generates_one_that_its_workers_read_from_the_file() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = config(root, "[rendezvous]\nmin_workers = 1\n[train]\nsteps = 2\nbatch_size = 4\n");
    let (coordinator, url) = serve(root, &cfg, &[]);
    let coordinator = finish(coordinator);
    // Written before the address, next to the state database, for the owner only.
    let file = root.join("token");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(token.len(), 64, "{token}");
    let file_arg = file.to_str().unwrap();

    let none = worker(&url, root, "w", &[], &[]);
    let none = finish(none).await.unwrap();
    assert_eq!(none.status.code(), Some(2), "{}", stderr(&none));
    assert!(stderr(&none).contains("no job token"), "{}", stderr(&none));

    let wrong = finish(worker(&url, root, "w", &["--token", "not-it"], &[])).await.unwrap();
    assert_eq!(wrong.status.code(), Some(1), "{}", stderr(&wrong));
    assert!(stderr(&wrong).contains("visible to other users"), "{}", stderr(&wrong));
    assert!(stderr(&wrong).contains("job token does not match"), "{}", stderr(&wrong));

    let args = ["status", "--addr", &url];
    let refused = command("coordinator", root, &args, &[("MTL_JOB_TOKEN", "not-it")]).output().unwrap();
    assert!(!refused.status.success() && stderr(&refused).contains("job token does not match"));
    let status = command("coordinator", root, &["status", "--addr", &url, "--token-file", file_arg], &[])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", stderr(&status));

    let right = finish(worker(&url, root, "w", &["--token-file", file_arg], &[])).await.unwrap();
    assert!(right.status.success(), "{}", stderr(&right));
    assert!(!stderr(&right).contains("visible to other users"), "{}", stderr(&right));
    let coordinator = coordinator.await.unwrap();
    assert!(coordinator.status.success(), "{}", stderr(&coordinator));
    let log = stderr(&coordinator);
    assert!(log.contains(file_arg) && !log.contains(&token), "the log names the file, not the token:\n{log}");
}
