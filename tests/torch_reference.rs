//! `bench/torch_reference.py`, the PyTorch replica that bench/compare.sh races against, has our
//! network's state dict: the same tensor names and shapes as the `model.safetensors` a real
//! `worker train --standalone` run writes, for the two benchmark models (the tiny model of
//! bench/throughput.toml and the ResNet-18-width model of bench/cpu_multitask.toml). Runs the
//! project venv's python (`.venv`, made by scripts/setup.sh, which `make test` runs first).
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_owned()
}

/// Names and shapes of the tensors in a safetensors file, from its JSON header.
fn safetensors_shapes(path: &Path) -> BTreeMap<String, Vec<i64>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, entry)| {
            let shape = entry["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
            (name.clone(), shape)
        })
        .collect()
}

/// Ours (a one-step run's final checkpoint) and the replica's state dict for `job` with the
/// same `--set` overrides.
fn both_state_dicts(job: &str) -> (BTreeMap<String, Vec<i64>>, BTreeMap<String, Vec<i64>>) {
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Tiny data and one step: the shapes do not depend on the image size or the data.
    let overrides = [
        format!("data.train={}", dir.path().join("data").display()),
        "data.synthetic_n=8".into(),
        "data.synthetic_size=32".into(),
        "data.synthetic_val_fraction=0.25".into(),
        "data.image_size=32".into(),
        "train.steps=1".into(),
        "train.batch_size=2".into(),
        "train.warmup_steps=0".into(),
        "train.eval_every_steps=0".into(),
        format!("checkpoint.dir={}", dir.path().join("checkpoints").display()),
    ];
    let sets: Vec<String> = overrides.iter().flat_map(|o| ["--set".to_string(), o.clone()]).collect();
    let run = Command::new(common::bin("worker"))
        .args(["train", "--standalone", "--config"])
        .arg(root.join(job))
        .args(&sets)
        .arg("--out")
        .arg(&out)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(run.status.success(), "worker train {job} failed:\n{}", String::from_utf8_lossy(&run.stderr));
    let ours = safetensors_shapes(&out.join("model.safetensors"));

    let python = root.join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh (make test does)", python.display());
    let params = Command::new(&python)
        .arg(root.join("bench/torch_reference.py"))
        .args(["params", "--config"])
        .arg(root.join(job))
        .args(&sets)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        params.status.success(),
        "torch_reference.py params {job} failed:\n{}",
        String::from_utf8_lossy(&params.stderr)
    );
    let theirs: BTreeMap<String, Vec<i64>> = serde_json::from_slice(&params.stdout).unwrap();
    (ours, theirs)
}

fn assert_same(job: &str, expected_len: usize) {
    let (ours, theirs) = both_state_dicts(job);
    let only_ours: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    let only_theirs: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    assert!(
        only_ours.is_empty() && only_theirs.is_empty(),
        "{job}: only ours {only_ours:?}, only the replica's {only_theirs:?}"
    );
    for (name, shape) in &ours {
        assert_eq!(shape, &theirs[name], "{job}: shape of {name}");
    }
    assert_eq!(ours.len(), expected_len, "{job}: tensors in the state dict");
}

#[test]
fn tiny_model_state_dict_matches_the_replica() {
    // GroupNorm backbone: no running statistics.
    assert_same("bench/throughput.toml", 94);
}

#[test]
fn resnet18_width_model_state_dict_matches_the_replica() {
    // BatchNorm backbone: 100 tensors as torchvision's resnet18 without fc and
    // num_batches_tracked, plus 58 of neck and heads.
    assert_same("bench/cpu_multitask.toml", 158);
}
