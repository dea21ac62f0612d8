//! SyncBatchNorm against LibTorch's own `batch_norm` (the kernel behind
//! `torch.nn.functional.batch_norm`): in a world of one they must agree, and N ranks over the
//! real ring must together compute BatchNorm of the concatenated batch.
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mtl_job::NormKind;
use tch::{nn, Device, Kind, Tensor};

use super::*;
use crate::collective::ring::Ring;
use crate::collective::RingCollective;
use crate::model::norm::{Norm, NormLayers};

const CHANNELS: i64 = 5;

/// A norm layer of `kind` in its own store, with the given weight and bias, in `dtype`.
fn layer(kind: NormKind, weight: &Tensor, bias: &Tensor, dtype: Kind) -> (nn::VarStore, NormLayers, Norm) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let layers = NormLayers::new(kind);
    let norm = Norm::new(vs.root(), &layers, CHANNELS);
    vs.set_kind(dtype);
    let vars = vs.variables();
    tch::no_grad(|| {
        vars["weight"].shallow_clone().copy_(weight);
        vars["bias"].shallow_clone().copy_(bias);
    });
    (vs, layers, norm)
}

/// What one training step of a layer produced: output, input gradient, weight and bias
/// gradients, running mean and variance.
struct Step {
    y: Tensor,
    dx: Tensor,
    dw: Tensor,
    db: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

/// Runs `steps` training forward/backward passes of `norm` on `x` with upstream gradient `g`
/// (weight and bias gradients accumulate over the steps) and reports the last.
fn train(vs: &nn::VarStore, norm: &Norm, x: &Tensor, g: &Tensor, steps: usize) -> Step {
    let mut x = x.detach().set_requires_grad(true);
    let mut y = Tensor::new();
    for _ in 0..steps {
        x.zero_grad();
        y = norm.forward(&x, true).unwrap();
        (&y * g).sum(Kind::Double).backward();
    }
    let vars = vs.variables();
    Step {
        y: y.detach(),
        dx: x.grad(),
        dw: vars["weight"].grad(),
        db: vars["bias"].grad(),
        running_mean: vars["running_mean"].copy(),
        running_var: vars["running_var"].copy(),
    }
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, rtol: f64) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    let scale = b.to_kind(Kind::Double).abs().max().double_value(&[]).max(1.0);
    assert!(diff <= rtol * scale, "{what}: differs by {diff} (scale {scale})");
}

fn inputs(n: i64, dtype: Kind) -> (Tensor, Tensor, Tensor, Tensor) {
    let opts = (dtype, Device::Cpu);
    // Under the generator's lock: a draw from LibTorch's one generator in parallel with another
    // test's seeded initial weights would change those weights.
    crate::model::with_seed(n, || {
        // A mean far from zero, so the variance would lose digits without the running-mean shift.
        let x = Tensor::randn([n, CHANNELS, 4, 3], opts) * 3.0 + 20.0;
        let g = Tensor::randn([n, CHANNELS, 4, 3], opts);
        let weight = Tensor::rand([CHANNELS], opts) + 0.5;
        let bias = Tensor::randn([CHANNELS], opts);
        (x, g, weight, bias)
    })
}

#[test]
fn in_a_world_of_one_sync_batch_norm_equals_batch_norm() {
    for (dtype, rtol) in [(Kind::Double, 1e-10), (Kind::Float, 2e-5)] {
        let (x, g, weight, bias) = inputs(4, dtype);
        let (bvs, _, batch) = layer(NormKind::Batch, &weight, &bias, dtype);
        let (svs, _, sync) = layer(NormKind::SyncBatch, &weight, &bias, dtype);
        assert!(matches!(sync, Norm::SyncBatch(_)));
        // Three steps: the later ones shift by a running mean that is no longer zero.
        let a = train(&bvs, &batch, &x, &g, 3);
        let b = train(&svs, &sync, &x, &g, 3);
        let what = |name: &str| format!("{dtype:?} {name}");
        assert_close(&what("output"), &b.y, &a.y, rtol);
        assert_close(&what("input gradient"), &b.dx, &a.dx, rtol);
        assert_close(&what("weight gradient"), &b.dw, &a.dw, rtol);
        assert_close(&what("bias gradient"), &b.db, &a.db, rtol);
        assert_close(&what("running mean"), &b.running_mean, &a.running_mean, rtol);
        assert_close(&what("running variance (unbiased)"), &b.running_var, &a.running_var, rtol);
        let eval = |norm: &Norm| tch::no_grad(|| norm.forward(&x, false).unwrap());
        assert_close(&what("evaluation"), &eval(&sync), &eval(&batch), rtol);
    }
}

#[test]
fn bf16_inputs_give_bf16_outputs_computed_in_f32() {
    let (x, g, weight, bias) = inputs(4, Kind::Float);
    let (vs, _, sync) = layer(NormKind::SyncBatch, &weight, &bias, Kind::Float);
    let (refs, _, reference) = layer(NormKind::SyncBatch, &weight, &bias, Kind::Float);
    let half = train(&vs, &sync, &x.to_kind(Kind::BFloat16), &g.to_kind(Kind::BFloat16), 1);
    let full = train(&refs, &reference, &x.to_kind(Kind::BFloat16).to_kind(Kind::Float), &g, 1);
    assert_eq!(
        (half.y.kind(), half.dx.kind(), half.dw.kind()),
        (Kind::BFloat16, Kind::BFloat16, Kind::Float)
    );
    // Only the bf16 rounding of the output and of the upstream gradient differs.
    assert_close("bf16 output", &half.y, &full.y, 2e-2);
    assert_close("bf16 running variance", &half.running_var, &full.running_var, 1e-5);
    assert_close("bf16 weight gradient", &half.dw, &full.dw, 2e-2);
}

/// Splits the batch of `sizes.iter().sum()` samples into per-rank batches of `sizes` (zero
/// allowed), runs SyncBatchNorm on each rank over the ring, and compares with BatchNorm of the
/// whole batch in one process.
fn ranks_equal_one_process(sizes: &[i64]) {
    let dtype = Kind::Double;
    let (x, g, weight, bias) = inputs(sizes.iter().sum(), dtype);
    let (vs, _, batch) = layer(NormKind::Batch, &weight, &bias, dtype);
    let whole = train(&vs, &batch, &x, &g, 2);

    let world = sizes.len();
    let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let starts: Vec<i64> = sizes.iter().scan(0, |s, &n| Some(std::mem::replace(s, *s + n))).collect();
    let ranks: Vec<Step> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                // Tensors are Send, not Sync: each rank gets its own.
                let (start, n) = (starts[rank], sizes[rank]);
                let (x, g) = (x.narrow(0, start, n).copy(), g.narrow(0, start, n).copy());
                let (weight, bias, addrs) = (weight.copy(), bias.copy(), &addrs);
                s.spawn(move || {
                    let t = Duration::from_secs(20);
                    let ring = Ring::for_tests(rank, addrs, listener, t);
                    let (vs, layers, norm) = layer(NormKind::SyncBatch, &weight, &bias, dtype);
                    let collective = SharedCollective::new(Box::new(RingCollective::new(ring, 1 << 20)));
                    layers.sync_context().unwrap().attach(collective);
                    train(&vs, &norm, &x, &g, 2)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cat = |f: fn(&Step) -> &Tensor| Tensor::cat(&ranks.iter().map(f).collect::<Vec<_>>(), 0);
    let sum =
        |f: fn(&Step) -> &Tensor| ranks.iter().map(|r| f(r).shallow_clone()).reduce(|a, b| a + b).unwrap();
    let what = |name: &str| format!("{sizes:?}: {name}");
    assert_close(&what("outputs"), &cat(|r| &r.y), &whole.y, 1e-10);
    assert_close(&what("input gradients"), &cat(|r| &r.dx), &whole.dx, 1e-10);
    // Weight and bias gradients stay local: the gradient all-reduce adds them up.
    assert_close(&what("weight gradient"), &sum(|r| &r.dw), &whole.dw, 1e-10);
    assert_close(&what("bias gradient"), &sum(|r| &r.db), &whole.db, 1e-10);
    for (rank, r) in ranks.iter().enumerate() {
        assert_close(
            &what(&format!("rank {rank} running mean")),
            &r.running_mean,
            &whole.running_mean,
            1e-10,
        );
        assert_close(
            &what(&format!("rank {rank} running variance")),
            &r.running_var,
            &whole.running_var,
            1e-10,
        );
    }
}

#[test]
fn ranks_over_the_ring_compute_batch_norm_of_the_whole_batch() {
    ranks_equal_one_process(&[3, 3]);
    ranks_equal_one_process(&[4, 1, 2]);
}

#[test]
fn a_rank_without_samples_takes_part_and_changes_nothing() {
    ranks_equal_one_process(&[5, 0]);
    ranks_equal_one_process(&[0, 4, 0]);
}

/// A collective that counts all-reduce calls and fails from the `fail_from`-th on.
struct Scripted {
    calls: Arc<AtomicUsize>,
    fail_from: usize,
}

impl Collective for Scripted {
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _: &mut [Tensor], _: ReduceOp) -> Result<(), CollectiveError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_from {
            return Err(CollectiveError::Unsupported {
                op: "all_reduce",
                message: "scripted failure".into(),
            });
        }
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [Tensor], _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

fn scripted_layer(fail_from: usize) -> (nn::VarStore, NormLayers, Norm, Arc<AtomicUsize>) {
    let (_, _, weight, bias) = inputs(1, Kind::Float);
    let (vs, layers, norm) = layer(NormKind::SyncBatch, &weight, &bias, Kind::Float);
    let calls = Arc::new(AtomicUsize::new(0));
    let collective = Scripted { calls: Arc::clone(&calls), fail_from };
    layers.sync_context().unwrap().attach(SharedCollective::new(Box::new(collective)));
    (vs, layers, norm, calls)
}

#[test]
fn one_call_in_forward_one_in_backward_none_in_evaluation_and_the_graph_keeps_its_context() {
    let (x, g, _, _) = inputs(3, Kind::Float);
    let (vs, layers, norm, calls) = scripted_layer(usize::MAX);
    let sync = Arc::clone(layers.sync_context().unwrap());
    let x = x.set_requires_grad(true);
    let y = norm.forward(&x, true).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "forward");
    assert!(Arc::strong_count(&sync) > 3, "the graph holds the context");
    // The layer and its store go away; the graph still reaches the collective through the
    // reference it holds.
    drop((norm, layers, vs));
    (&y * &g).sum(Kind::Float).backward();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "backward");
    assert!(x.grad().defined());
    drop(y);
    assert_eq!(Arc::strong_count(&sync), 1, "the graph released its reference");

    let (_vs, _layers, norm, calls) = scripted_layer(usize::MAX);
    let _ = tch::no_grad(|| norm.forward(&x, false)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0, "evaluation uses the running statistics");
}

#[test]
fn a_failing_collective_is_an_error_in_forward_and_in_backward() {
    let (x, g, _, _) = inputs(3, Kind::Float);
    let (_vs, _layers, norm, _) = scripted_layer(0);
    let err = norm.forward(&x, true).unwrap_err().to_string();
    assert!(err.contains("SyncBatchNorm forward") && err.contains("scripted failure"), "{err}");

    let (_vs, _layers, norm, _) = scripted_layer(1);
    let x = x.set_requires_grad(true);
    let y = norm.forward(&x, true).unwrap();
    let err = (&y * &g).sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(err.contains("SyncBatchNorm backward") && err.contains("scripted failure"), "{err}");
}

#[test]
fn a_wrong_input_is_an_error_naming_the_layer() {
    let (_, _, weight, bias) = inputs(1, Kind::Float);
    let (_vs, _layers, norm) = layer(NormKind::SyncBatch, &weight, &bias, Kind::Float);
    let x = Tensor::zeros([2, CHANNELS + 1, 3, 3], (Kind::Float, Device::Cpu));
    let err = norm.forward(&x, true).unwrap_err().to_string();
    assert!(err.contains("SyncBatchNorm of 5 channels"), "{err}");
}

#[test]
fn sync_batch_models_have_batch_norm_names_and_running_buffers() {
    let build = |norm| {
        let section = mtl_job::ModelSection { norm, ..Default::default() };
        let tasks = mtl_job::TasksSection::default();
        crate::model::with_seed(0, || {
            MultiTaskModel::new(&section, &tasks, &crate::tasks::tests::test_info(), Device::Cpu)
        })
        .unwrap()
    };
    let shapes = |m: &MultiTaskModel| {
        let mut v: Vec<_> =
            m.var_store().variables().into_iter().map(|(n, t)| (n, t.size(), t.requires_grad())).collect();
        v.sort();
        v
    };
    let (batch, sync) = (build(NormKind::Batch), build(NormKind::SyncBatch));
    assert_eq!(shapes(&sync), shapes(&batch), "a sync_batch checkpoint loads into a batch model");
    assert!(sync.sync_context().is_some() && batch.sync_context().is_none());
    let names = |m: &MultiTaskModel| m.running_buffers().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert!(names(&sync).contains(&"backbone.bn1.running_var".to_string()));
    assert_eq!(names(&sync), names(&batch));
    assert!(names(&build(NormKind::Group)).is_empty());
    assert!(names(&build(NormKind::FrozenBatch)).is_empty(), "frozen statistics never change");
}
