//! The long worker commands show a progress bar on a terminal; anywhere else (a file, a pipe, a
//! launcher) they log plain progress lines instead, which stay readable.
mod common;

use std::process::Command;

use common::bin;

#[test]
fn gen_data_logs_plain_progress_lines_when_stderr_is_no_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("shapes");
    let out = Command::new(bin("worker"))
        .args(["gen-data", "shapes", "--out", out_dir.to_str().unwrap(), "--n", "40", "--size", "16"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(out_dir.join("dataset.json").is_file());
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains("generating: ")).collect();
    // A line per tenth at most (plus one every few seconds on a slow machine), the last at 100%.
    assert!(progress.len() >= 2, "{stderr}");
    let last = progress.last().unwrap();
    assert!(last.contains("generating: 40/40 images") && last.contains("percent=100"), "{stderr}");
    assert!(last.contains("per_s=") && last.contains("eta_s=0"), "rate and ETA: {last}");
    assert!(!stderr.contains('\r') && !stderr.contains('\u{1b}'), "no bar drawing: {stderr:?}");
}
