//! Checkpoints: exact resume through the standalone loop, checksums, fallback to the previous
//! complete checkpoint, pruning, refusing another job's checkpoint, export.
use std::collections::BTreeMap;
use std::path::Path;

use mtl_job::JobConfig;
use tch::Device;

use super::*;
use crate::collective::LocalCollective;
use crate::train::standalone::{self, Event, Options};
use crate::train::StepValues;

/// A 48-sample training split (64 synthetic images, a quarter held out) at batch 4: 12 steps
/// an epoch, so 20 steps cross one epoch boundary.
fn job(dir: &Path, extra: &str) -> JobConfig {
    let text = format!(
        r#"
[job]
name = "resume"
seed = 5
[data]
format = "synthetic"
train = "{}"
synthetic_n = 64
synthetic_size = 32
synthetic_val_fraction = 0.25
image_size = 32
loader_threads = 2
[model]
backbone = "tiny"
norm = "group"
[train]
steps = 20
batch_size = 4
lr = 0.01
warmup_steps = 3
clip_grad_norm = 1.0
momentum = 0.9
weight_decay = 0.0001
log_every_steps = 100
eval_every_steps = 10
[checkpoint]
keep_last = 10
{extra}
"#,
        dir.join("data").display()
    );
    JobConfig::from_toml(&text).expect("test job")
}

fn with_dir(cfg: &JobConfig, dir: &Path) -> JobConfig {
    let mut cfg = cfg.clone();
    cfg.checkpoint.dir = dir.display().to_string();
    cfg
}

/// Runs standalone training; returns the step reports it produced and the summary.
fn run(cfg: &JobConfig, opts: &Options) -> (Vec<StepValues>, standalone::Summary) {
    let mut steps = Vec::new();
    let summary = standalone::run(cfg, Device::Cpu, opts, &mut |event| {
        if let Event::Step { report, .. } = event {
            steps.push(report.read().unwrap());
        }
    })
    .unwrap();
    (steps, summary)
}

/// The three tensor files of two checkpoints are byte-identical (safetensors orders entries
/// by dtype and name, so equal bytes mean equal names, shapes, dtypes and values).
fn assert_same_state(a: &Path, b: &Path, what: &str) {
    let (a, b) = (open(a).unwrap(), open(b).unwrap());
    for file in [MODEL, OPTIMIZER, WEIGHTING] {
        assert!(a.files[file] == b.files[file], "{what}: {file} differs");
    }
    let (sa, sb) = (a.trainer_state().unwrap(), b.trainer_state().unwrap());
    assert!(!sa.optimizer.is_empty() && !sa.model.is_empty());
    assert_eq!(sa.step, sb.step);
    assert_eq!(a.meta, b.meta, "{what}: state.json");
}

/// An uninterrupted run of 20 steps against runs stopped and resumed: at step 7 (the middle
/// of epoch 0) and, with `from_boundary`, from the uninterrupted run's checkpoint at step 12
/// (the end of epoch 0). Every step report after the resume and the final state must be
/// bit-identical.
fn check_exact_resume(extra: &str, edit: impl Fn(&mut JobConfig), from_boundary: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = job(tmp.path(), &format!("every_steps = 6\n{extra}"));
    edit(&mut cfg);

    // Uninterrupted: checkpoints at 6, 12 (the end of epoch 0), 18 and 20.
    let whole = with_dir(&cfg, &tmp.path().join("whole"));
    let (reference, summary) = run(&whole, &Options::default());
    assert_eq!(reference.len(), 20);
    let dir = whole.checkpoint.dir_path("");
    assert_eq!(list(&dir).unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), [6, 12, 18, 20]);
    let meta = |step: u64| open(&dir.join(format!("step-{step}"))).unwrap().meta;
    assert_eq!(meta(6).position(), Position { epoch: 0, consumed: 24 });
    assert_eq!(meta(12).position(), Position { epoch: 1, consumed: 0 });
    assert_eq!(meta(20).position(), Position { epoch: 1, consumed: 32 });
    assert!(meta(6).metrics.is_empty() && meta(20).metrics.len() == summary.last.len());

    // Stopped in the middle of epoch 0, resumed from the directory.
    let stopped = with_dir(&cfg, &tmp.path().join("stopped"));
    let stopped_dir = stopped.checkpoint.dir_path("");
    let (first, _) = run(&stopped, &Options { stop_at_step: Some(7), ..Default::default() });
    assert_eq!(first, reference[..7], "the same first steps");
    let (rest, resumed) = run(&stopped, &Options { resume: Some(stopped_dir.clone()), ..Default::default() });
    assert_eq!(rest, reference[7..], "steps 8..20: losses, weights, lr and norms bit-identical");
    assert_eq!(resumed.last, summary.last);
    assert_same_state(&dir.join("step-20"), &stopped_dir.join("step-20"), "stopped at 7");

    if from_boundary {
        let boundary = with_dir(&cfg, &tmp.path().join("boundary"));
        let (rest, _) = run(&boundary, &Options { resume: Some(dir.join("step-12")), ..Default::default() });
        assert_eq!(rest, reference[12..]);
        assert_same_state(&dir.join("step-20"), &boundary.checkpoint.dir_path("").join("step-20"), "from 12");
    }
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one_with_sgd_and_uncertainty_weighting() {
    check_exact_resume("[weighting]\nstrategy = \"uncertainty\"", |c| c.train.nesterov = true, true);
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one_with_adamw_and_gradnorm() {
    check_exact_resume(
        "[weighting]\nstrategy = \"gradnorm\"",
        |c| c.train.optimizer = mtl_job::OptimizerKind::Adamw,
        false,
    );
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one_with_pcgrad_and_batchnorm() {
    // BatchNorm's running statistics are model variables: saved, restored, and left alone by
    // the evaluations in between.
    check_exact_resume(
        "[weighting]\nstrategy = \"pcgrad\"",
        |c| c.model.norm = mtl_job::NormKind::Batch,
        false,
    );
}

/// A trainer at step 0 on `cfg`'s data, and what a checkpoint of it records.
fn untrained(cfg: &JobConfig) -> (Trainer, crate::data::OrderedSplit) {
    let (train, _, model) = crate::train::job::open_job(cfg, Device::Cpu).unwrap();
    (Trainer::new(cfg, model, Box::new(LocalCollective)).unwrap(), train)
}

fn record<'a>(
    cfg: &'a JobConfig,
    train: &'a crate::data::OrderedSplit,
    metrics: Option<&'a BTreeMap<String, f64>>,
) -> Record<'a> {
    Record { cfg, info: &train.dataset.info, train, next: Position::default(), generation: 0, metrics }
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn the_newest_complete_checkpoint_is_used_and_corrupt_or_partial_ones_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = job(tmp.path(), "");
    let (trainer, train) = untrained(&cfg);
    let dir = tmp.path().join("ckpt");
    for step in 1..=4 {
        write_at(&dir.join(format!("step-{step}")), &trainer, &record(&cfg, &train, None)).unwrap();
    }
    // An interrupted write and an unrelated directory are not checkpoints.
    std::fs::create_dir_all(dir.join(".step-9.tmp-1")).unwrap();
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    assert_eq!(newest(&dir).unwrap().0.path, dir.join("step-4"));

    flip_byte(&dir.join("step-4").join(MODEL), 1000);
    std::fs::remove_file(dir.join("step-3").join("manifest.json")).unwrap();
    let (found, rejected) = newest(&dir).unwrap();
    assert_eq!(found.path, dir.join("step-2"));
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].path, dir.join("step-4"));
    assert!(rejected[0].reason.starts_with("model.safetensors: sha256"), "{}", rejected[0].reason);
    assert_eq!(rejected[1].path, dir.join("step-3"));
    assert!(rejected[1].reason.contains("incomplete"), "{}", rejected[1].reason);

    // Named directly, a corrupt checkpoint is an error that names it.
    let err = open(&dir.join("step-4")).unwrap_err().to_string();
    assert!(err.contains("step-4") && err.contains("sha256"), "{err}");
    // A truncated file is caught by its size; with nothing complete left, the error lists why.
    let state = dir.join("step-2").join(STATE);
    let text = std::fs::read(&state).unwrap();
    std::fs::write(&state, &text[..text.len() - 1]).unwrap();
    std::fs::remove_dir_all(dir.join("step-1")).unwrap();
    let err = open(&dir).unwrap_err().to_string();
    assert!(err.contains("no complete checkpoint"), "{err}");
    assert!(
        err.contains(&format!(
            "step-2: state.json: {} bytes, the manifest says {}",
            text.len() - 1,
            text.len()
        )),
        "{err}"
    );
}

#[test]
fn a_failed_write_names_the_path_and_leaves_earlier_checkpoints_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = job(tmp.path(), "");
    let (trainer, train) = untrained(&cfg);
    let dir = tmp.path().join("ckpt");
    write_step(&dir, &trainer, &record(&cfg, &train, None)).unwrap();
    // A file where the new checkpoint's directory must go: the OS refuses (also to root).
    let blocked = dir.join("step-0").join(MODEL).join("more").join("step-1");
    let err = write_at(&blocked, &trainer, &record(&cfg, &train, None)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, WorkerError::CheckpointWrite { .. }), "{message}");
    assert!(message.contains(&dir.join("step-0").join(MODEL).display().to_string()), "{message}");
    assert!(message.contains("Not a directory"), "{message}");
    assert_eq!(open(&dir).unwrap().path, dir.join("step-0"));
    assert!(disk::leftovers(&dir).is_empty());
}

#[test]
fn pruning_keeps_the_newest_and_the_best_and_removes_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = job(tmp.path(), "");
    let (trainer, train) = untrained(&cfg);
    let dir = tmp.path().join("ckpt");
    let ap50 = [0.1, 0.5, 0.2, 0.3, f64::NAN];
    for (step, ap) in (1..=5).zip(ap50) {
        let metrics = BTreeMap::from([("AP50".to_string(), ap)]);
        write_at(&dir.join(format!("step-{step}")), &trainer, &record(&cfg, &train, Some(&metrics))).unwrap();
    }
    std::fs::create_dir_all(dir.join(".step-6.tmp-77")).unwrap();
    let section =
        CheckpointSection { keep_last: 2, keep_best: "detection.AP50".into(), ..cfg.checkpoint.clone() };
    let removed = prune(&dir, &section).unwrap();
    assert_eq!(removed.len(), 3);
    let left: Vec<u64> = list(&dir).unwrap().iter().map(|(s, _)| *s).collect();
    assert_eq!(left, [2, 4, 5], "the two newest and the best (AP50 0.5)");
    assert!(disk::leftovers(&dir).is_empty());
    // Without keep_best only the newest stay.
    let section = CheckpointSection { keep_last: 1, ..cfg.checkpoint.clone() };
    prune(&dir, &section).unwrap();
    assert_eq!(list(&dir).unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), [5]);
}

#[test]
fn another_job_or_another_split_cannot_resume_and_the_error_names_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = job(tmp.path(), "");
    let (trainer, train) = untrained(&cfg);
    let path = tmp.path().join("step-0");
    write_at(&path, &trainer, &record(&cfg, &train, None)).unwrap();
    let ckpt = open(&path).unwrap();
    ckpt.check_resumable(&cfg, &train).unwrap();

    // Where checkpoints go, how many are kept and the token do not change the job.
    let mut moved = cfg.clone();
    moved.checkpoint.every_steps = 7;
    moved.checkpoint.dir = "elsewhere".into();
    moved.job.token = mtl_job::JobToken::new("secret");
    ckpt.check_resumable(&moved, &train).unwrap();
    assert!(!String::from_utf8_lossy(&ckpt.files[JOB]).contains("secret"));

    let mut changed = cfg.clone();
    changed.train.lr = 0.5;
    let err = ckpt.check_resumable(&changed, &train).unwrap_err().to_string();
    assert!(err.contains("train.lr (0.01 -> 0.5)"), "{err}");

    let mut ids = train.ids.clone();
    ids.pop();
    let other = crate::data::OrderedSplit { dataset: train.dataset.clone(), ids };
    let err = ckpt.check_resumable(&cfg, &other).unwrap_err().to_string();
    assert!(err.contains("another training split (48 samples"), "{err}");
}

#[test]
fn a_run_from_scratch_refuses_a_directory_with_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = with_dir(&job(tmp.path(), ""), &tmp.path().join("ckpt"));
    let (trainer, train) = untrained(&cfg);
    write_step(&cfg.checkpoint.dir_path(""), &trainer, &record(&cfg, &train, None)).unwrap();
    let err = standalone::run(&cfg, Device::Cpu, &Options::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("already holds checkpoints") && err.contains("--resume"), "{err}");
}

#[test]
fn export_writes_the_model_variables_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = job(tmp.path(), "[weighting]\nstrategy = \"uncertainty\"");
    let (trainer, train) = untrained(&cfg);
    let path = tmp.path().join("step-0");
    write_at(&path, &trainer, &record(&cfg, &train, None)).unwrap();
    let out = tmp.path().join("export").join("model.safetensors");
    let count = open(&path).unwrap().export_model(&out).unwrap();
    let exported = tch::Tensor::read_safetensors(&out).unwrap();
    let vars = trainer.model.var_store().variables();
    assert_eq!(count, vars.len());
    assert_eq!(exported.len(), vars.len());
    for (name, tensor) in &exported {
        assert!(tensor.equal(&vars[name]), "{name}");
    }
    assert!(!exported.iter().any(|(n, _)| n.starts_with("weighting.")), "no training state");
}
