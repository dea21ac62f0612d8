//! Data-parallel equivalence: N ranks (threads, talking over the real TCP ring) with batch b
//! end with the same parameters as one rank with batch N*b; distributed evaluation merges to
//! exactly the single-process metrics.
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use mtl_job::{sharding, JobConfig, NormKind};
use tch::{Device, Tensor};

use super::epochs::Position;
use super::*;
use crate::collective::ring::Ring;
use crate::collective::{LocalCollective, RingCollective};
use crate::data::OrderedSplit;
use crate::data::{open_dataset, Loader, LoaderConfig, Split};
use crate::model::MultiTaskModel;

const STEPS: u64 = 3;

fn job(dir: &Path, extra: &str) -> JobConfig {
    let text = format!(
        r#"
[job]
name = "equivalence"
seed = 11
[data]
format = "synthetic"
train = "{}"
synthetic_n = 64
synthetic_size = 32
synthetic_val_fraction = 0.25
image_size = 32
loader_threads = 1
[model]
backbone = "tiny"
norm = "group"
# Small buckets: the gradients of the tiny model reduce in many buckets, overlapped with
# backward (`comm.overlap` is on by default) on 2 and 3 ranks.
[comm]
bucket_bytes = 16384
[train]
steps = {STEPS}
lr = 0.01
clip_grad_norm = 1.0
momentum = 0.9
weight_decay = 0.0001
{extra}
"#,
        dir.display()
    );
    JobConfig::from_toml(&text).expect("test job")
}

/// Makes the training split partially labelled: classes on one sample in four, boxes on two in
/// three, masks on one in two, so ranks hold different label counts per task, zero included.
fn make_partial(dir: &Path) {
    let path = dir.join("train.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = v["id"].as_u64().unwrap();
        let obj = v.as_object_mut().unwrap();
        if !id.is_multiple_of(4) {
            obj.remove("class");
        }
        if id.is_multiple_of(3) {
            obj.remove("boxes");
        }
        if id.is_multiple_of(2) {
            obj.remove("mask");
        }
        out.push_str(&serde_json::to_string(&v).unwrap());
        out.push('\n');
    }
    std::fs::write(&path, out).unwrap();
}

/// Trains `STEPS` steps on `world` ranks with per-rank batch `batch`, every rank starting from
/// `initial`'s weights; returns rank 0's parameters and checks every rank ended identical.
fn train_parameters(cfg: &JobConfig, initial: &MultiTaskModel, world: usize, batch: u32) -> Trained {
    let results = train_ranks(cfg, initial, world, batch);
    for other in &results[1..] {
        for ((name, a), (_, b)) in results[0].params.iter().zip(&other.params) {
            assert!(a.equal(b), "ranks disagree on {name}");
        }
        for ((name, a), (_, b)) in
            results[0].model.running_buffers().iter().zip(other.model.running_buffers())
        {
            assert!(a.equal(&b), "ranks disagree on the buffer {name}");
        }
        assert_eq!(results[0].losses, other.losses, "every rank reports the same global losses");
    }
    results.into_iter().next().unwrap()
}

/// Trains `STEPS` steps on `world` ranks (threads over the real ring) with per-rank batch
/// `batch`, every rank starting from `initial`'s weights; returns what every rank ended with.
fn train_ranks(cfg: &JobConfig, initial: &MultiTaskModel, world: usize, batch: u32) -> Vec<Trained> {
    train_ranks_with(cfg, initial, world, batch, RankSetup::default())
}

/// What [`train_ranks_with`] changes on every rank beyond the job.
#[derive(Debug, Default, Clone, Copy)]
struct RankSetup {
    /// Adds to the classification head a parameter no loss uses: backward never gives it a
    /// gradient (its hook never fires), yet it is reduced and updated like the others.
    unused_param: bool,
    /// Makes each hook that completes a gradient bucket wait until the overlap thread has
    /// reduced it (see `Overlap::hold_backward_for_reduces`).
    hold_for_reduces: bool,
}

/// The name of [`RankSetup::unused_param`].
const UNUSED: &str = "heads.classification.unused";

/// [`train_ranks`], with every rank set up as `setup` says.
fn train_ranks_with(
    cfg: &JobConfig,
    initial: &MultiTaskModel,
    world: usize,
    batch: u32,
    setup: RankSetup,
) -> Vec<Trained> {
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    let info = train.dataset.info.clone();
    // Copied, not re-seeded: LibTorch's RNG is shared with every test running concurrently.
    let models: Vec<MultiTaskModel> = (0..world)
        .map(|_| {
            let mut m = job::job_model(cfg, &info, Device::Cpu).unwrap();
            m.var_store_mut().copy(initial.var_store()).unwrap();
            if setup.unused_param {
                let path = m.var_store().root() / "heads" / "classification";
                let _ = path.var("unused", &[5], tch::nn::Init::Const(0.5));
            }
            m
        })
        .collect();
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut cfg = cfg.clone();
    cfg.train.batch_size = batch;
    std::thread::scope(|s| {
        let handles: Vec<_> = models
            .into_iter()
            .zip(listeners)
            .enumerate()
            .map(|(rank, (model, listener))| {
                let (cfg, train, addrs) = (&cfg, &train, &addrs);
                s.spawn(move || {
                    let t = Duration::from_secs(60);
                    let ring = Ring::for_tests(rank, addrs, listener, t);
                    let mut trainer =
                        Trainer::new(cfg, model, Box::new(RingCollective::new(ring, 1 << 20))).unwrap();
                    if let (true, Some(overlap)) = (setup.hold_for_reduces, &trainer.overlap) {
                        overlap.hold_backward_for_reduces();
                    }
                    let shard = sharding::train_shard(sharding::ShardSpec {
                        samples: train.ids.len() as u64,
                        seed: cfg.job.seed,
                        epoch: 0,
                        consumed: 0,
                        world_size: world as u32,
                        rank: rank as u32,
                        batch_size: batch,
                    });
                    assert!(shard.steps >= STEPS, "dataset too small for the test");
                    let ids = train.ids_at(&shard.positions);
                    // FCOS targets built by the loader threads, as in training.
                    let lc = LoaderConfig::from_section(&cfg.data, batch as usize, true, cfg.job.seed, 0)
                        .for_training(&trainer.model);
                    let (mut losses, mut overlapped) = (Vec::new(), Vec::new());
                    for b in Loader::new(train.dataset.clone(), &ids, lc).unwrap().take(STEPS as usize) {
                        losses.push(trainer.step(&b.unwrap()).unwrap().read().unwrap().losses);
                        if let Some(overlap) = &trainer.overlap {
                            overlapped.push(overlap.reduced_during_backward());
                        }
                    }
                    Trained { params: trainer.model.parameters(), losses, overlapped, model: trainer.model }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// What a (simulated) data-parallel run ends with on one rank.
struct Trained {
    params: Vec<(String, Tensor)>,
    /// The losses each step reported (averaged over ranks).
    losses: Vec<crate::task::TaskValues>,
    /// Per step, when the gradients were reduced during backward: per bucket, whether its
    /// all-reduce started before backward returned. Empty without overlap.
    overlapped: Vec<Vec<bool>>,
    /// The rank's model.
    model: MultiTaskModel,
}

/// allclose per tensor: rtol 1e-5 of the tensor's largest value, atol 1e-6 for tensors that
/// are still near zero (zero-initialised biases and residual-branch scales), where fp32
/// summation-order noise (about 1e-7 seen) is all that differs. A wrong normaliser or loss
/// scaling moves parameters by 3e-4 and more within these three steps.
fn assert_close(single: &Trained, multi: &Trained, what: &str) {
    for (step, (a, b)) in single.losses.iter().zip(&multi.losses).enumerate() {
        for task in crate::task::Task::ALL {
            let (a, b) = (a.value(task), b.value(task));
            assert_eq!(a.is_some(), b.is_some(), "{what}: step {step} {}", task.name());
            if let (Some(a), Some(b)) = (a, b) {
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs() + 1e-6,
                    "{what}: step {step} loss/{} {a} vs {b}",
                    task.name()
                );
            }
        }
    }
    let mut worst = 0f64;
    for ((name, a), (_, b)) in single.params.iter().zip(&multi.params) {
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * scale + 1e-6, "{what}: {name} differs by {diff} (scale {scale})");
        worst = worst.max(diff / scale.max(1e-2));
    }
    eprintln!("{what}: worst relative difference {worst:e}");
}

fn check_equivalence(extra: &str, partial: bool) {
    check_equivalence_with(NormKind::Group, extra, partial);
}

fn check_equivalence_with(norm: NormKind, extra: &str, partial: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = job(dir.path(), extra);
    cfg.model.norm = norm;
    open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap(); // generate once
    if partial {
        make_partial(dir.path());
    }
    let info = open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap().info;
    let model = job::job_model(&cfg, &info, Device::Cpu).unwrap();
    let initial = model.parameters();
    let b = 2;
    let single = train_parameters(&cfg, &model, 1, 2 * b);
    let moved = single.params.iter().zip(&initial).any(|((_, a), (_, i))| !a.equal(i));
    assert!(moved, "training changed the parameters");
    assert_close(&single, &train_parameters(&cfg, &model, 2, b), "2 ranks");
    let single3 = train_parameters(&cfg, &model, 1, 3 * b);
    assert_close(&single3, &train_parameters(&cfg, &model, 3, b), "3 ranks");
}

#[test]
fn two_and_three_ranks_equal_one_rank_with_the_whole_batch() {
    check_equivalence("", false);
}

#[test]
fn equivalence_holds_with_partial_labels() {
    check_equivalence("", true);
}

#[test]
fn equivalence_holds_with_pcgrad_and_partial_labels() {
    check_equivalence("[weighting]\nstrategy = \"pcgrad\"", true);
}

#[test]
fn sync_batch_norm_ranks_equal_one_rank_with_the_whole_batch() {
    check_equivalence_with(NormKind::SyncBatch, "", false);
}

#[test]
fn sync_batch_norm_equivalence_holds_with_pcgrad_and_partial_labels() {
    // PCGrad runs one backward pass per task, each through every SyncBatchNorm layer.
    check_equivalence_with(NormKind::SyncBatch, "[weighting]\nstrategy = \"pcgrad\"", true);
}

#[test]
fn with_sync_batch_norm_a_rank_with_an_empty_batch_keeps_the_others_in_step() {
    // Every image of rank 1's first batch is unreadable: it still makes every SyncBatchNorm
    // collective call (forward and backward on zero images), and the step equals one process's
    // on the readable images.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = job(dir.path(), "");
    cfg.model.norm = NormKind::SyncBatch;
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    let b = 2;
    let shard = sharding::train_shard(sharding::ShardSpec {
        samples: train.ids.len() as u64,
        seed: cfg.job.seed,
        epoch: 0,
        consumed: 0,
        world_size: 2,
        rank: 1,
        batch_size: b,
    });
    let unreadable = train.ids_at(&shard.positions[..b as usize]);
    for s in train.dataset.samples.iter().filter(|s| unreadable.contains(&s.id)) {
        std::fs::write(&s.image, b"corrupt").unwrap();
    }
    let model = job::job_model(&cfg, &train.dataset.info, Device::Cpu).unwrap();
    let single = train_parameters(&cfg, &model, 1, 2 * b);
    assert_close(&single, &train_parameters(&cfg, &model, 2, b), "2 ranks, rank 1's first batch empty");
}

#[test]
fn batch_norm_ranks_keep_rank_0s_statistics_and_evaluate_as_its_model() {
    for norm in [NormKind::Batch, NormKind::SyncBatch] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = job(dir.path(), "");
        cfg.model.norm = norm;
        let info = open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap().info;
        let model = job::job_model(&cfg, &info, Device::Cpu).unwrap();
        let ranks = train_ranks(&cfg, &model, 2, 2);
        let buffers = ranks[0].model.running_buffers();
        let initial = model.running_buffers();
        assert!(!buffers.is_empty());
        assert!(buffers.iter().zip(&initial).any(|((_, a), (_, b))| !a.equal(b)), "training updated them");
        for ((name, a), (_, b)) in buffers.iter().zip(ranks[1].model.running_buffers()) {
            assert!(a.equal(&b), "{norm:?}: rank 1's {name} is not rank 0's");
        }
        // Each rank evaluates its validation shard with its own model; merged, that must be the
        // evaluation of rank 0's model (the one checkpoints save) on the whole split.
        let val = OrderedSplit::new(open_dataset(&cfg.data, Split::Val, cfg.job.seed).unwrap().unwrap());
        let eval = |model: &MultiTaskModel, ids: &[u64]| {
            let lc = LoaderConfig::from_section(&cfg.data, 4, false, cfg.job.seed, 0);
            eval::evaluate(model, Loader::new(val.dataset.clone(), ids, lc).unwrap(), &val.dataset.info)
                .unwrap()
        };
        let whole = eval(&ranks[0].model, &val.ids).finish().to_map();
        let mut merged = mtl_metrics::EvalStats::default();
        for (rank, trained) in ranks.iter().enumerate() {
            let shard = val.ids_at(&sharding::val_shard(val.ids.len() as u64, 2, rank as u32));
            merged.merge(&eval(&trained.model, &shard)).unwrap();
        }
        assert_same_metrics(&merged.finish().to_map(), &whole, &format!("{norm:?}, 2 ranks"));
    }
}

fn assert_same_metrics(got: &BTreeMap<String, f64>, want: &BTreeMap<String, f64>, what: &str) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}");
    for (k, v) in want {
        assert!(got[k] == *v || (got[k].is_nan() && v.is_nan()), "{what}: {k} = {} vs {v}", got[k]);
    }
}

#[test]
fn distributed_evaluation_equals_one_process_exactly() {
    for norm in [NormKind::Group, NormKind::Batch, NormKind::SyncBatch] {
        check_distributed_evaluation(norm);
    }
}

fn check_distributed_evaluation(norm: NormKind) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = job(dir.path(), "");
    cfg.model.norm = norm;
    cfg.train.steps = 20;
    cfg.checkpoint.dir = dir.path().join("checkpoints").display().to_string();
    let opts = standalone::Options { out: Some(dir.path().join("ckpt")), ..Default::default() };
    let summary = standalone::run(&cfg, Device::Cpu, &opts, &mut |_| {}).unwrap();
    assert!(summary.steps == 20);
    let loaded = checkpoint::open(&dir.path().join("ckpt")).unwrap();
    let mut model = crate::model::with_seed(0, || {
        MultiTaskModel::new(&loaded.cfg.model, &loaded.cfg.tasks, &loaded.info, Device::Cpu)
    })
    .unwrap();
    loaded.load_model(&mut model).unwrap();
    let val = OrderedSplit::new(open_dataset(&cfg.data, Split::Val, cfg.job.seed).unwrap().unwrap());
    let eval_ids = |ids: &[u64]| {
        let lc = LoaderConfig::from_section(&cfg.data, 4, false, cfg.job.seed, 0);
        eval::evaluate(&model, Loader::new(val.dataset.clone(), ids, lc).unwrap(), &loaded.info).unwrap()
    };
    let whole = eval_ids(&val.ids).finish().to_map();
    assert_eq!(whole, summary.last, "the saved model evaluates as the trained one did");
    for world in 1..=3u32 {
        let mut merged = mtl_metrics::EvalStats::default();
        // Merge in reverse rank order: the result must not depend on arrival order.
        for rank in (0..world).rev() {
            let shard = val.ids_at(&sharding::val_shard(val.ids.len() as u64, world, rank));
            let stats = eval_ids(&shard);
            let wire: mtl_metrics::EvalStats =
                serde_json::from_slice(&serde_json::to_vec(&stats).unwrap()).unwrap();
            merged.merge(&wire).unwrap();
        }
        assert_same_metrics(&merged.finish().to_map(), &whole, &format!("{norm:?}, {world} ranks"));
    }
}

#[test]
fn a_step_on_an_empty_batch_keeps_the_rank_in_step() {
    // Every image of a chunk unreadable: the loader yields a batch of 0 samples, and the rank
    // must still run the step (and its collectives) like the others.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "");
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    for s in &train.dataset.samples {
        std::fs::write(&s.image, b"corrupt").unwrap();
    }
    let model = job::job_model(&cfg, &train.dataset.info, Device::Cpu).unwrap();
    let before: Vec<(String, Tensor)> =
        model.parameters().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let mut trainer = Trainer::new(&cfg, model, Box::new(LocalCollective)).unwrap();
    let lc = LoaderConfig::from_section(&cfg.data, 4, true, cfg.job.seed, 0).for_training(&trainer.model);
    let mut loader = Loader::new(train.dataset.clone(), &train.ids[..4], lc).unwrap();
    let batch = loader.next().unwrap().unwrap();
    assert_eq!(batch.ids.len(), 0);
    let report = trainer.step(&batch).unwrap().read().unwrap();
    assert_eq!(report.samples, 0);
    assert_eq!(loader.summary().skipped.len(), 4, "skipped and counted");
    // No samples: every loss and gradient is zero, so parameters without weight decay
    // (biases, norm scales) do not move at all.
    assert!(report.losses.cls.unwrap().abs() < 1e-12);
    let after = trainer.model.parameters();
    let mut checked = 0;
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        if !crate::optim::decays(name, b) {
            assert!(a.equal(b), "{name} moved without samples");
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn bf16_steps_track_fp32_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "");
    let mut bf16 = cfg.clone();
    bf16.train.precision = mtl_job::Precision::Bf16;
    let info = open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap().info;
    let model = job::job_model(&cfg, &info, Device::Cpu).unwrap();
    let a = train_parameters(&cfg, &model, 1, 4);
    let b = train_parameters(&bf16, &model, 1, 4);
    // The first step sees identical weights: only bf16 rounding in the forward pass differs.
    // Later steps diverge the way any perturbation does early in training, so they only need
    // to stay finite.
    for task in crate::task::Task::ALL {
        let (x, y) = (a.losses[0].value(task).unwrap(), b.losses[0].value(task).unwrap());
        // bf16 keeps 8 mantissa bits: logits move by up to a few percent (about 3% seen).
        assert!((x - y).abs() <= 0.1 * x.abs() + 1e-3, "first step {}: fp32 {x} bf16 {y}", task.name());
        assert!(b.losses.iter().all(|l| l.value(task).unwrap().is_finite()));
    }
    // bf16 rounding shows: the runs are close but not identical.
    assert!(a.params.iter().zip(&b.params).any(|((_, x), (_, y))| !x.equal(y)));
}

#[test]
fn equivalence_holds_with_gradnorm() {
    check_equivalence("[weighting]\nstrategy = \"gradnorm\"", false);
}

#[test]
fn equivalence_holds_with_gradnorm_and_partial_labels() {
    check_equivalence("[weighting]\nstrategy = \"gradnorm\"", true);
}

#[test]
fn gradnorm_sees_every_task_at_the_layer_it_balances() {
    // The FPN output conv GradNorm used to balance at is never reached by classification
    // (it reads C5): its gradient norm there was 0 and its weight never balanced.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "[weighting]\nstrategy = \"gradnorm\"");
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    let model = job::job_model(&cfg, &train.dataset.info, Device::Cpu).unwrap();
    let mut trainer = Trainer::new(&cfg, model, Box::new(LocalCollective)).unwrap();
    let lc = LoaderConfig::from_section(&cfg.data, 4, true, cfg.job.seed, 0);
    for batch in Loader::new(train.dataset.clone(), &train.ids[..8], lc).unwrap() {
        let report = trainer.step(&batch.unwrap()).unwrap().read().unwrap();
        for task in crate::task::Task::ALL {
            let norm = report.task_grad_norms.value(task);
            assert!(norm.is_some_and(|n| n > 0.0), "step {}: {} has norm {norm:?}", report.step, task.name());
        }
        assert!(report.scalars().iter().any(|(k, _)| k == "grad_norm/cls"));
    }
}

/// Trains through the real epoch loop and records every step's report with its epoch.
struct Recorder {
    spec: sharding::ShardSpec,
    reports: Vec<(u64, StepValues)>,
}

impl Recorder {
    fn new(cfg: &JobConfig, world_size: u32, rank: u32) -> Self {
        let spec = sharding::ShardSpec {
            samples: 0,
            seed: cfg.job.seed,
            epoch: 0,
            consumed: 0,
            world_size,
            rank,
            batch_size: cfg.train.batch_size,
        };
        Recorder { spec, reports: Vec::new() }
    }
}

impl epochs::Driver for Recorder {
    fn train_shard(
        &mut self,
        epoch: u64,
        consumed: u64,
        train: &OrderedSplit,
    ) -> Result<sharding::TrainShard, WorkerError> {
        let samples = train.ids.len() as u64;
        Ok(sharding::train_shard(sharding::ShardSpec { samples, epoch, consumed, ..self.spec }))
    }

    fn after_step(
        &mut self,
        epoch: u64,
        report: &StepReport,
        _: Option<&StepValues>,
        _: Option<Rates>,
    ) -> Result<(), WorkerError> {
        self.reports.push((epoch, report.read()?));
        Ok(())
    }

    fn evaluate(&mut self, _: &Trainer, _: u64) -> Result<(), WorkerError> {
        Ok(())
    }
}

/// DWA's weights in every step of `reports` against eq. 7 of Liu et al. (2019) computed here
/// from the epoch means of the reported (rank-averaged) losses: 1 in the first two epochs,
/// `K·exp(r_t/T)/Σ_i exp(r_i/T)` with `r_t = L̄_t(e−1)/L̄_t(e−2)` after. Returns how far the
/// weights moved from 1.
fn check_dwa_weights(reports: &[(u64, StepValues)], temperature: f64) -> f64 {
    let epochs = reports.last().unwrap().0 as usize + 1;
    let mut means = vec![[0f64; 3]; epochs];
    for (e, mean) in means.iter_mut().enumerate() {
        let steps: Vec<&StepValues> =
            reports.iter().filter(|(re, _)| *re as usize == e).map(|(_, r)| r).collect();
        for task in crate::task::Task::ALL {
            let sum = steps.iter().fold(0.0, |s, r| s + r.losses.value(task).unwrap());
            mean[task.index()] = sum / steps.len() as f64;
        }
    }
    let mut moved = 0f64;
    for (epoch, report) in reports {
        let e = *epoch as usize;
        let want: Vec<f64> = if e < 2 {
            vec![1.0; 3]
        } else {
            let r: Vec<f64> = (0..3).map(|t| means[e - 1][t] / means[e - 2][t]).collect();
            let z: f64 = r.iter().map(|r| (r / temperature).exp()).sum();
            r.iter().map(|r| 3.0 * (r / temperature).exp() / z).collect()
        };
        for task in crate::task::Task::ALL {
            let got = report.weights.value(task).unwrap();
            let want = want[task.index()];
            assert!(
                (got - want).abs() <= 1e-12,
                "epoch {e} step {}: {} weight {got}, eq. 7 gives {want}",
                report.step,
                task.name()
            );
            moved = moved.max((got - 1.0).abs());
        }
    }
    moved
}

fn dwa_job(dir: &Path) -> JobConfig {
    let mut cfg = job(dir, "[weighting]\nstrategy = \"dwa\"");
    // 24 training samples: 6 steps of 4 per epoch, 4 epochs.
    cfg.data.synthetic_n = 32;
    cfg.train.batch_size = 4;
    cfg.train.steps = 24;
    cfg
}

#[test]
fn dwa_weights_follow_the_epoch_means_through_the_epoch_loop() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dwa_job(dir.path());
    let (train, _, model) = super::job::open_job(&cfg, Device::Cpu).unwrap();
    assert_eq!(train.ids.len(), 24);
    let mut trainer = Trainer::new(&cfg, model, Box::new(LocalCollective)).unwrap();
    let mut recorder = Recorder::new(&cfg, 1, 0);
    let outcome =
        epochs::train(&cfg, &mut trainer, &train, Position::default(), None, &mut recorder).unwrap();
    assert_eq!(outcome.epochs, 4);
    let moved = check_dwa_weights(&recorder.reports, cfg.weighting.dwa_temperature);
    assert!(moved > 1e-3, "DWA's weights must move after two epochs (moved {moved})");
}

#[test]
fn dwa_weights_agree_on_two_ranks_over_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = dwa_job(dir.path());
    cfg.train.batch_size = 2;
    let (train, _, _) = super::job::open_job(&cfg, Device::Cpu).unwrap();
    let info = train.dataset.info.clone();
    let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let reports: Vec<Vec<(u64, StepValues)>> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (cfg, train, addrs, info) = (&cfg, &train, &addrs, &info);
                s.spawn(move || {
                    let t = Duration::from_secs(60);
                    let ring = Ring::for_tests(rank, addrs, listener, t);
                    // Rank 0's initial weights reach rank 1 through the trainer's broadcast.
                    let model = job::job_model(cfg, info, Device::Cpu).unwrap();
                    let mut trainer =
                        Trainer::new(cfg, model, Box::new(RingCollective::new(ring, 1 << 20))).unwrap();
                    let mut recorder = Recorder::new(cfg, 2, rank as u32);
                    epochs::train(cfg, &mut trainer, train, Position::default(), None, &mut recorder)
                        .unwrap();
                    recorder.reports
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(reports[0].len(), 24);
    for ((_, a), (_, b)) in reports[0].iter().zip(&reports[1]) {
        assert_eq!(a.weights, b.weights, "step {}: ranks disagree on DWA's weights", a.step);
    }
    let moved = check_dwa_weights(&reports[0], cfg.weighting.dwa_temperature);
    assert!(moved > 1e-3, "DWA's weights must move after two epochs (moved {moved})");
}

#[test]
fn labels_outside_the_models_label_space_are_an_error_not_a_panic() {
    // A manifest whose dataset.json declares only the background class while its masks hold
    // the shapes' classes: LibTorch rejects the targets, and the standalone run says where.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = job(dir.path(), "");
    open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap(); // generate
    let info_path = dir.path().join("dataset.json");
    let mut info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&info_path).unwrap()).unwrap();
    info["seg_classes"] = serde_json::json!(["background"]);
    std::fs::write(&info_path, info.to_string()).unwrap();
    cfg.data.format = mtl_job::DataFormat::Jsonl;
    cfg.data.train = dir.path().join("train.jsonl");
    let err = standalone::run(&cfg, Device::Cpu, &standalone::Options::default(), &mut |_| {}).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, WorkerError::TorchAt { .. }), "{message}");
    assert!(message.starts_with("segmentation loss: ") && message.contains("out of bounds"), "{message}");
    assert!(!message.contains("Exception raised from"), "no C++ stack trace: {message}");
}

mod overlapped;
mod unreadable;

/// One counted training step (after a first, uncounted one) and the reading of its report:
/// the ops each dispatched, with the host reads among them.
fn counted_step(extra: &str) -> (crate::op_count::OpCounts, crate::op_count::OpCounts) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), extra);
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, cfg.job.seed).unwrap().unwrap());
    let model = job::job_model(&cfg, &train.dataset.info, Device::Cpu).unwrap();
    let mut trainer = Trainer::new(&cfg, model, Box::new(LocalCollective)).unwrap();
    let lc = LoaderConfig::from_section(&cfg.data, 4, true, cfg.job.seed, 0);
    let mut batches = Loader::new(train.dataset.clone(), &train.ids[..8], lc).unwrap().map(Result::unwrap);
    trainer.step(&batches.next().unwrap()).unwrap();
    let batch = batches.next().unwrap();
    let (report, step) = crate::op_count::count_ops(|| trainer.step(&batch).unwrap());
    let (values, read) = crate::op_count::count_ops(|| report.read().unwrap());
    assert!(values.losses.iter().all(|(_, l)| l.is_finite()) && values.samples == 4);
    (step, read)
}

#[test]
fn a_training_step_reads_nothing_from_the_device() {
    // On a GPU a host read makes the host wait for every queued kernel: the step must have none
    // (ops that read values, ops whose output size depends on the data, copies to the host),
    // with clipping, momentum and every weighting strategy. Reading the report is where the
    // host reads (log steps only).
    for weighting in ["fixed", "uncertainty", "dwa", "gradnorm", "pcgrad"] {
        let (step, read) = counted_step(&format!("[weighting]\nstrategy = \"{weighting}\""));
        assert_eq!(step.host_reads(), Vec::<(String, u64)>::new(), "{weighting}: host reads in the step");
        assert!(step.calls("aten::convolution") > 0 && step.calls("aten::convolution_backward") > 0);
        assert!(read.calls("aten::_local_scalar_dense") > 0, "{weighting}: reading the report is counted");
        eprintln!("{weighting}: {} ops per step", step.ops());
        // The budget of a step with one backward pass: about 3,050 ops (nested ones included)
        // with the fused optimizer and the flat gradient buffer, 6,011 before (per-parameter
        // loops); on a GPU the colour jitter adds 82 (`Batch::to_device`). Headroom for LibTorch's CPU kernels choosing other nested paths on other
        // machines. GradNorm and PCGrad take a backward pass per task.
        if !matches!(weighting, "gradnorm" | "pcgrad") {
            assert!(step.ops() < 4_000, "{weighting}: {} ops in one step", step.ops());
        }
    }
}
