//! The deployment files under deploy/, checked without a cluster: the Slurm batch script runs
//! against stand-in `srun`, `scontrol` and `hostname` (and stand-in binaries) that log their
//! arguments and environment; the Kubernetes base is validated against the Kubernetes schemas
//! (`kubernetes-validate`, installed by scripts/setup.sh) and its cross-references checked; the
//! Dockerfile's build-context paths and stages are checked, and built where a daemon answers.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/usr/bin/env bash\nset -euo pipefail\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Stand-ins write each call's argv (one argument a line) to `$LOG/<name>.argv` and its
/// environment to `<name>.env`.
const LOG_CALL: &str =
    r#"log_call() { local name=$1; shift; printf '%s\n' "$@" >"$LOG/$name.argv"; env >"$LOG/$name.env"; }"#;

struct SlurmRun {
    status: Option<i32>,
    output: String,
    log: PathBuf,
    shared: PathBuf,
}

impl SlurmRun {
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.log.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", self.output))
    }

    fn argv(&self, name: &str) -> Vec<String> {
        self.read(&format!("{name}.argv")).lines().map(String::from).collect()
    }

    fn env(&self, name: &str) -> BTreeMap<String, String> {
        self.read(&format!("{name}.env"))
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// Runs deploy/slurm/mtl.sbatch as `sbatch` would on a 2-node allocation with 4 GPUs a node;
/// the stand-in coordinator exits with `coordinator_status`.
fn run_sbatch(dir: &Path, coordinator_status: i32) -> SlurmRun {
    let (mut command, log, shared) = sbatch(dir, &format!("exit {coordinator_status}"));
    let out = command.output().expect("bash runs the batch script");
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    SlurmRun { status: out.status.code(), output, log, shared }
}

/// The batch script's command with its stand-ins; the stand-in coordinator ends with
/// `coordinator_end` (shell) once it has written its address file. Returns it with the log
/// and shared directories.
fn sbatch(dir: &Path, coordinator_end: &str) -> (Command, PathBuf, PathBuf) {
    let (fakes, bin, log, shared) =
        (dir.join("fakes"), dir.join("bin"), dir.join("log"), dir.join("shared").join("job"));
    for d in [&fakes, &bin, &log] {
        std::fs::create_dir_all(d).unwrap();
    }
    script(
        &fakes.join("scontrol"),
        &format!(
            "{LOG_CALL}\nlog_call \"scontrol-$1\" \"$@\"\n\
             if [[ \"$1 $2\" == 'show hostnames' ]]; then [[ \"$3\" == 'node-[a-b]' ]]; printf 'node-a\\nnode-b\\n'; fi"
        ),
    );
    script(&fakes.join("hostname"), "echo \"${FAKE_HOSTNAME:?}\"");
    // srun: every task of every node, one after the other, with the variables Slurm sets.
    script(
        &fakes.join("srun"),
        &format!(
            "{LOG_CALL}\nlog_call srun \"$@\"\nper_node=\n\
             for a in \"$@\"; do case $a in --ntasks-per-node=*) per_node=${{a#*=}};; esac; done\n\
             cmd=${{!#}}\n\
             for node in node-a node-b; do for ((i = 0; i < per_node; i++)); do\n\
               SLURMD_NODENAME=$node SLURM_LOCALID=$i FAKE_HOSTNAME=$node \"$cmd\"\n\
             done; done"
        ),
    );
    script(
        &bin.join("coordinator"),
        &format!(
            "{LOG_CALL}\nlog_call coordinator \"$@\"\n\
             while [[ $# -gt 0 ]]; do [[ $1 == --addr-file ]] && echo 0.0.0.0:50051 >\"$2\"; shift; done\n\
             {coordinator_end}"
        ),
    );
    script(
        &bin.join("worker"),
        &format!("{LOG_CALL}\nlog_call \"worker-$SLURMD_NODENAME-$SLURM_LOCALID\" \"$@\""),
    );
    let mut command = Command::new("bash");
    command
        .arg(repo().join("deploy/slurm/mtl.sbatch"))
        .current_dir(dir)
        .env("PATH", format!("{}:{}", fakes.display(), std::env::var("PATH").unwrap()))
        .env("LOG", &log)
        .env("FAKE_HOSTNAME", "node-a")
        .env("MTL_HOME", repo())
        .env("MTL_BIN", &bin)
        .env("MTL_SHARED", &shared)
        .env("SLURM_SUBMIT_DIR", repo())
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_JOB_NODELIST", "node-[a-b]")
        .env("SLURM_JOB_NUM_NODES", "2")
        .env("SLURM_NTASKS", "8")
        .env("SLURM_NTASKS_PER_NODE", "4")
        .env("SLURM_GPUS_ON_NODE", "4")
        .env_remove("MTL_JOB_TOKEN");
    (command, log, shared)
}

#[test]
fn slurm_script_starts_the_coordinator_on_the_first_node_and_a_worker_per_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_sbatch(dir.path(), 0);
    assert_eq!(run.status, Some(0), "{}", run.output);
    let shared = run.shared.display().to_string();

    // The coordinator: on this node (the first), listening on every interface, its state and
    // checkpoints on the shared path, the rendezvous waiting for every task.
    let argv = run.argv("coordinator");
    assert_eq!(argv[0], "serve");
    let listen = argv.iter().position(|a| a == "--listen").expect("--listen");
    assert_eq!(argv[listen + 1], "0.0.0.0:50051");
    assert!(argv.windows(2).any(|w| w[0] == "--token-file" && w[1] == format!("{shared}/token")), "{argv:?}");
    let env = run.env("coordinator");
    assert_eq!(env["MTL_SERVER__STATE_DB"], format!("{shared}/state.db"));
    assert_eq!(env["MTL_CHECKPOINT__DIR"], format!("{shared}/checkpoints"));
    assert_eq!(env["MTL_RENDEZVOUS__MIN_WORKERS"], "8");
    assert_eq!(env["MTL_SERVER__STOP_TIMEOUT_MS"], "20000");
    assert_eq!(run.argv("scontrol-show"), ["show", "hostnames", "node-[a-b]"]);

    // srun: both nodes, 4 tasks each.
    let srun = run.argv("srun");
    assert!(
        srun.contains(&"--nodes=2".to_string()) && srun.contains(&"--ntasks-per-node=4".to_string()),
        "{srun:?}"
    );

    // A worker per GPU: device from the local id, peers on its node, the coordinator on node-a.
    for node in ["node-a", "node-b"] {
        for i in 0..4 {
            let name = format!("worker-{node}-{i}");
            let argv = run.argv(&name);
            let flag = |f: &str| {
                argv[argv.iter().position(|a| a == f).unwrap_or_else(|| panic!("{f}: {argv:?}")) + 1].clone()
            };
            assert_eq!(argv[0], "run");
            assert_eq!(flag("--device"), format!("cuda:{i}"));
            assert_eq!(flag("--peer-addr"), format!("{node}:0"));
            assert_eq!(flag("--worker-id"), format!("{node}-gpu0{i}"));
            assert_eq!(flag("--coordinator"), "http://node-a:50051");
            assert_eq!(flag("--token-file"), format!("{shared}/token"));
            assert_eq!(run.env(&name)["MTL_COORDINATOR"], "http://node-a:50051");
        }
    }
    assert!(!run.log.join("worker-node-a-4.argv").exists(), "4 workers a node");

    // The token: a file only the user reads, never on a command line.
    let token_file = run.shared.join("token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(token.len() >= 32, "{token}");
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    for entry in std::fs::read_dir(&run.log).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "argv") {
            let argv = std::fs::read_to_string(&path).unwrap();
            assert!(!argv.contains(token.trim()), "the token is on the command line of {}", path.display());
        }
    }
    assert!(!run.log.join("scontrol-requeue.argv").exists(), "a finished job is not requeued");
}

#[test]
fn slurm_script_passes_on_the_coordinators_stopped_status() {
    // Stopped by scancel or preemption (75): the job says so; Slurm requeues a preempted job
    // itself (--requeue), and the script requeues only when its own time limit warning came.
    let dir = tempfile::tempdir().unwrap();
    let run = run_sbatch(dir.path(), 75);
    assert_eq!(run.status, Some(75), "{}", run.output);
    assert!(run.output.contains("coordinator exited with status 75"), "{}", run.output);
    assert!(!run.log.join("scontrol-requeue.argv").exists());
}

/// Starts the batch script with a stand-in coordinator that runs until SIGTERM (then exits
/// 75, as the real one does after the final checkpoint), sends `signal` to the script once its
/// workers ran, and returns its exit status and the log directory.
fn signal_sbatch(dir: &Path, signal: &str) -> (Option<i32>, PathBuf, String) {
    let (mut command, log, _) = sbatch(
        dir,
        "trap 'echo TERM >\"$LOG/coordinator.signal\"; exit 75' TERM\nwhile :; do sleep 0.05; done",
    );
    let mut child =
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // The traps are set before srun starts; the last worker's log says the srun step ran.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !log.join("worker-node-b-3.env").exists() {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the batch script exited ({:?}) before its workers ran:\n{}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(std::time::Instant::now() < deadline, "the batch script never started its workers");
        std::thread::sleep(std::time::Duration::from_millis(20)); // polling the log, not syncing
    }
    let sent = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(log.join("coordinator.signal")).ok().as_deref(),
        Some("TERM\n"),
        "{output}"
    );
    (out.status.code(), log, output)
}

#[test]
fn slurm_script_passes_sigterm_to_the_coordinator_and_requeues_only_at_the_time_limit() {
    // scancel / preemption: SIGTERM to the script, which the coordinator gets; no requeue by
    // the script (Slurm requeues a preempted job itself).
    let dir = tempfile::tempdir().unwrap();
    let (status, log, output) = signal_sbatch(dir.path(), "TERM");
    assert_eq!(status, Some(75), "{output}");
    assert!(!log.join("scontrol-requeue.argv").exists(), "{output}");

    // --signal=B:USR1@180: the time limit is near; the coordinator stops with a checkpoint and
    // the script requeues the job.
    let dir = tempfile::tempdir().unwrap();
    let (status, log, output) = signal_sbatch(dir.path(), "USR1");
    assert_eq!(status, Some(75), "{output}");
    let requeue: Vec<String> = std::fs::read_to_string(log.join("scontrol-requeue.argv"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(requeue, ["requeue", "4242"], "{output}");
}

/// The project venv's Python (scripts/setup.sh makes it).
fn venv_python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh (make test does)", python.display());
    python
}

#[test]
fn kubernetes_base_is_valid_against_the_schemas_and_its_references_agree() {
    let out = Command::new(venv_python()).arg(repo().join("deploy/k8s/check.py")).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !text.contains("No module named"),
        "kubernetes-validate is not installed in .venv: run scripts/setup.sh\n{text}"
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("4 resources valid against the Kubernetes"), "{text}");
}

#[test]
fn kubernetes_base_builds_with_kustomize_where_kubectl_exists() {
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        println!("skipped: no kubectl on this machine (deploy/k8s/check.py still validates the base)");
        return;
    }
    // A copy with a token file, as a user creates one before `kubectl apply -k`.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo().join("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n != "token") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.path().join("token"), "test-token").unwrap();
    let out = Command::new("kubectl").arg("kustomize").arg(dir.path()).output().unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for kind in ["ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "Deployment", "Job"] {
        assert!(yaml.contains(&format!("kind: {kind}\n")), "no {kind}:\n{yaml}");
    }
    assert!(yaml.contains("app.kubernetes.io/name: mtl"), "{yaml}");
}

/// The Dockerfile's instructions, continuation lines joined.
fn dockerfile() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn dockerfile_copies_paths_that_exist_from_stages_that_exist() {
    let ignored: Vec<String> = std::fs::read_to_string(repo().join(".dockerignore"))
        .unwrap()
        .lines()
        .map(|l| l.trim().trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut stages: Vec<String> = Vec::new();
    let mut copies = 0;
    for instruction in dockerfile() {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        match words[0] {
            "FROM" => {
                let image = words[1];
                assert!(!stages.iter().any(|s| s == image) || image.contains(':'), "{instruction}");
                match words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
                    Some(i) => stages.push(words[i + 1].to_string()),
                    None => stages.push(String::new()),
                }
            }
            "COPY" => {
                copies += 1;
                let from = words.iter().find_map(|w| w.strip_prefix("--from="));
                let args: Vec<&str> = words[1..].iter().filter(|w| !w.starts_with("--")).copied().collect();
                let (sources, _dest) = args.split_at(args.len() - 1);
                match from {
                    Some(stage) => assert!(
                        stages[..stages.len() - 1].iter().any(|s| s == stage),
                        "`{instruction}` copies from stage `{stage}`, not defined before it ({stages:?})"
                    ),
                    None => {
                        for source in sources {
                            let source = source.trim_end_matches('/');
                            assert!(
                                repo().join(source).exists(),
                                "`{instruction}`: {source} is not in the build context (the repository root)"
                            );
                            assert!(
                                !ignored.iter().any(|i| i == source),
                                "`{instruction}`: {source} is excluded by .dockerignore"
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(stages, ["build", "runtime"], "a build stage, then the runtime stage");
    assert!(copies >= 8, "{copies} COPY instructions");
    let all = dockerfile().join("\n");
    for needed in
        ["./scripts/setup.sh", "--bin coordinator --bin worker", "torch/lib", "nvidia", "USER 10001"]
    {
        assert!(all.contains(needed), "the Dockerfile lacks `{needed}`");
    }
    // Every workspace member is in the image's build (cargo reads every member's manifest).
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let members = manifest.split("members = [").nth(1).unwrap().split(']').next().unwrap();
    for member in members.split(',').map(|m| m.trim().trim_matches('"')) {
        assert!(all.contains(&format!("COPY {member} {member}")), "workspace member {member} is not copied");
    }
}

#[test]
fn dockerfile_builds_where_a_docker_daemon_answers() {
    let daemon = Command::new("docker").arg("info").output();
    match daemon {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            println!(
                "skipped: `docker info` failed, no daemon to build with: {}",
                String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default()
            );
            return;
        }
        Err(err) => {
            println!("skipped: no docker command ({err})");
            return;
        }
    }
    let out = Command::new("docker")
        .args(["build", "-f", "deploy/docker/Dockerfile", "-t", "mtl:test", "."])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run =
        Command::new("docker").args(["run", "--rm", "mtl:test", "worker", "--version"]).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
}
