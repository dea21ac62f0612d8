//! `worker bench-step` on CPU with a tiny model: it trains the job's model on pre-loaded
//! batches and prints one JSON object with the step time (bench/gpu_compare.sh reads it).
//! No timing is asserted, only that the numbers are there and consistent.
mod common;

use std::process::Command;

fn bench_step(dir: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"bench-step\"\n[data]\nformat = \"synthetic\"\ntrain = \"{}\"\nsynthetic_n = 24\n\
             synthetic_size = 32\nimage_size = 32\nloader_threads = 1\n[model]\nbackbone = \"tiny\"\n\
             [train]\nbatch_size = 4\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(common::bin("worker"))
        .args(["bench-step", "--config"])
        .arg(&job)
        .args(["--warmup", "1", "--steps", "3", "--batches", "2", "--json"])
        .args(extra)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench-step failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn bench_step_prints_the_step_time_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench_step(dir.path(), &[]);
    let ms = r["ms_per_step"].as_f64().unwrap();
    let images_per_s = r["images_per_s"].as_f64().unwrap();
    assert!(ms > 0.0 && ms.is_finite(), "{r}");
    // images/s is the batch over the step time.
    assert!((images_per_s - 4.0 * 1000.0 / ms).abs() <= 1e-6 * images_per_s, "{r}");
    assert_eq!(
        (r["batch_size"].as_u64(), r["image_size"].as_u64(), r["steps"].as_u64()),
        (Some(4), Some(32), Some(3))
    );
    assert_eq!((r["precision"].as_str(), r["channels_last"].as_bool()), (Some("fp32"), Some(false)));
    assert_eq!(r["device"], "Cpu");

    let r = bench_step(dir.path(), &["--set", "train.channels_last=true", "--set", "train.precision=bf16"]);
    assert_eq!((r["precision"].as_str(), r["channels_last"].as_bool()), (Some("bf16"), Some(true)), "{r}");
    assert!(r["ms_per_step"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_step_refuses_zero_steps() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.toml"), "[job]\nname = \"x\"\n").unwrap();
    let out = Command::new(common::bin("worker"))
        .args(["bench-step", "--config"])
        .arg(dir.path().join("job.toml"))
        .args(["--steps", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--steps"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
