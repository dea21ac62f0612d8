//! Checkpoints of `worker train --standalone`, with real processes: a run stopped at a step or
//! killed with SIGKILL and resumed ends bit-identical to an uninterrupted one; a corrupt newest
//! checkpoint is skipped and named in the log; a write the OS refuses (a file size limit, as a
//! full disk would) fails the run with the path and the OS error and leaves the previous
//! checkpoint usable; `worker export` writes the model alone.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// 64 synthetic images, 48 for training: 12 steps an epoch at batch 4, so 30 steps cross two
/// epoch boundaries.
fn job_file(dir: &Path) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "[job]\nname = \"ckpt\"\nseed = 3\n[data]\nformat = \"synthetic\"\ntrain = \"{}\"\nsynthetic_n = 64\n\
             synthetic_size = 32\nsynthetic_val_fraction = 0.25\nimage_size = 32\nloader_threads = 1\n\
             [model]\nbackbone = \"tiny\"\nnorm = \"group\"\n\
             [train]\nsteps = 30\nbatch_size = 4\nlr = 0.01\nwarmup_steps = 3\nclip_grad_norm = 1.0\n\
             log_every_steps = 10\n[weighting]\nstrategy = \"uncertainty\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

fn train(job: &Path, ckpt: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(common::bin("worker"));
    cmd.args(["train", "--standalone", "--json", "--config", job.to_str().unwrap()])
        .args(["--set", &format!("checkpoint.dir={}", ckpt.display())])
        .args(extra)
        .env("RUST_LOG", "info");
    cmd
}

fn succeed(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Model, optimizer and weighting state of two checkpoints are byte-identical.
fn assert_same_state(a: &Path, b: &Path) {
    for file in ["model.safetensors", "optimizer.safetensors", "weighting.safetensors", "state.json"] {
        let (x, y) = (std::fs::read(a.join(file)).unwrap(), std::fs::read(b.join(file)).unwrap());
        assert!(x == y, "{file} of {} and {} differ", a.display(), b.display());
    }
}

#[test]
fn stopped_or_killed_runs_resume_bit_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path());
    let whole = dir.path().join("whole");
    let reference = succeed(&mut train(&job, &whole, &[])).stdout;
    assert!(whole.join("step-30").is_dir());

    // A planned stop in the middle of epoch 0, then a resume from the directory.
    let stopped = dir.path().join("stopped");
    let out = succeed(&mut train(&job, &stopped, &["--stop-at-step", "7"]));
    assert!(!stopped.join("step-30").exists() && stopped.join("step-7").is_dir());
    assert!(String::from_utf8_lossy(&out.stderr).contains("training stopped"));
    let resumed = succeed(&mut train(&job, &stopped, &["--resume", stopped.to_str().unwrap()]));
    assert_eq!(resumed.stdout, reference, "the same final metrics");
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resumed"));
    assert_same_state(&whole.join("step-30"), &stopped.join("step-30"));

    // SIGKILL after a periodic checkpoint; whatever it was doing then (a step, a write) is lost.
    let killed = dir.path().join("killed");
    let mut child = train(&job, &killed, &["--set", "checkpoint.every_steps=2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !killed.join("step-4").is_dir() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its checkpoint at step 4");
        assert!(Instant::now() < deadline, "no checkpoint at step 4 within 300 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("step-30").exists(), "killed before the end");
    let resumed = succeed(&mut train(&job, &killed, &["--resume", killed.to_str().unwrap()]));
    assert_eq!(resumed.stdout, reference);
    assert_same_state(&whole.join("step-30"), &killed.join("step-30"));

    // The model alone, as a file other tools read.
    let exported = dir.path().join("model.safetensors");
    let out = succeed(Command::new(common::bin("worker")).args([
        "export",
        "--checkpoint",
        whole.join("step-30").to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(step 30)"));
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        std::fs::read(whole.join("step-30/model.safetensors")).unwrap()
    );
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_and_named_and_the_previous_one_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path());
    let ckpt = dir.path().join("ckpt");
    succeed(&mut train(&job, &ckpt, &["--set", "checkpoint.every_steps=3", "--stop-at-step", "6"]));
    let model = ckpt.join("step-6/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(&model, bytes).unwrap();

    let out = succeed(&mut train(&job, &ckpt, &["--resume", ckpt.to_str().unwrap(), "--stop-at-step", "9"]));
    let log = String::from_utf8_lossy(&out.stderr);
    let skipped = log
        .lines()
        .find(|l| l.contains("skipping a corrupt or incomplete checkpoint"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(skipped.contains("step-6") && skipped.contains("model.safetensors: sha256"), "{skipped}");
    assert!(
        log.lines().any(|l| l.contains("resumed") && l.contains("step-3") && l.contains("step=3")),
        "{log}"
    );
    assert!(ckpt.join("step-9").is_dir());

    // Named directly, the corrupt one is an error, not a silent fallback.
    let out = train(&job, &ckpt, &["--resume", ckpt.join("step-6").to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("step-6") && stderr.contains("sha256"), "{stderr}");
}

#[test]
fn a_refused_write_fails_the_run_with_the_path_and_os_error_and_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(dir.path());
    let ckpt = dir.path().join("ckpt");
    succeed(&mut train(&job, &ckpt, &["--stop-at-step", "2"]));
    let before = std::fs::read(ckpt.join("step-2/model.safetensors")).unwrap();

    // A 16 KiB file size limit (SIGXFSZ ignored, so write(2) fails with EFBIG): the model
    // file of the next checkpoint cannot be written, as on a full disk. Reading is unaffected.
    let resume = train(&job, &ckpt, &["--resume", ckpt.to_str().unwrap(), "--stop-at-step", "4"]);
    let mut limited = Command::new("bash");
    limited
        .args(["-c", "trap '' XFSZ; ulimit -f 16; exec \"$@\"", "limited"])
        .arg(resume.get_program())
        .args(resume.get_args());
    let out = limited.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run must fail:\n{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(error.contains("cannot write checkpoint") && error.contains(".step-4.tmp-"), "{error}");
    assert!(error.contains("model.safetensors") && error.contains("File too large"), "{error}");

    // The previous checkpoint is intact and nothing half-written is left.
    let names: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step-2"]);
    assert_eq!(std::fs::read(ckpt.join("step-2/model.safetensors")).unwrap(), before);
    succeed(Command::new(common::bin("worker")).args([
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        dir.path().join("m.safetensors").to_str().unwrap(),
    ]));
}
