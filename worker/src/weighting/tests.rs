//! Each strategy against an independent computation: closed forms, hand-computed values, and
//! plain autograd on a toy two-task model.
use std::sync::{Arc, Barrier, Mutex};

use mtl_job::{WeightingSection, WeightingStrategy};
use tch::{Device, Kind, Tensor};

use super::pcgrad::project_conflicts;
use super::*;

fn cfg(strategy: WeightingStrategy) -> WeightingSection {
    WeightingSection { strategy, ..WeightingSection::default() }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w} ({got:?} vs {want:?})");
    }
}

/// Shared layer (tanh(x·Wᵀ + b)) with two linear heads: `cls` regresses `ya`, `seg` regresses
/// `yb`. With `yb = −3·ya` the two tasks pull the shared layer in conflicting directions.
struct Toy {
    shared: Vec<Tensor>,
    heads: Vec<Tensor>,
}

impl Toy {
    fn new() -> Self {
        let w = Tensor::from_slice(&[0.3f32, -0.1, 0.2, 0.05, 0.4, -0.3, -0.2, 0.1, 0.25, 0.15, -0.05, 0.35]);
        let b = Tensor::from_slice(&[0.01f32, -0.02, 0.03, 0.0]);
        let wa = Tensor::from_slice(&[0.5f32, -0.4, 0.3, 0.2]);
        let wb = Tensor::from_slice(&[0.45f32, -0.35, 0.25, 0.3]);
        Self {
            shared: vec![w.reshape([4, 3]).set_requires_grad(true), b.set_requires_grad(true)],
            heads: vec![
                wa.reshape([1, 4]).set_requires_grad(true),
                wb.reshape([1, 4]).set_requires_grad(true),
            ],
        }
    }

    fn copy(&self) -> Self {
        self.on(self.shared[0].device())
    }

    fn on(&self, device: Device) -> Self {
        let c = |v: &[Tensor]| {
            v.iter().map(|t| t.detach().to_device(device).copy().set_requires_grad(true)).collect()
        };
        Self { shared: c(&self.shared), heads: c(&self.heads) }
    }

    /// Sum of squared errors over the rows of `x`, divided by `normaliser`.
    fn losses(&self, x: &Tensor, ya: &Tensor, yb: &Tensor, normaliser: f64) -> TaskLosses {
        let h = (x.matmul(&self.shared[0].tr()) + &self.shared[1]).tanh();
        let sse =
            |head: &Tensor, y: &Tensor| (h.matmul(&head.tr()).squeeze_dim(1) - y).square().sum(Kind::Float);
        TaskLosses {
            cls: Some(sse(&self.heads[0], ya) / normaliser),
            det: None,
            seg: Some(sse(&self.heads[1], yb) / normaliser),
        }
    }

    /// GradNorm balances at the shared layer's weight.
    fn params(&self) -> Params<'_> {
        Params { shared: &self.shared, heads: &self.heads, gradnorm_layer: Some(&self.shared[0]) }
    }

    fn grads(&self) -> Vec<Vec<f64>> {
        self.shared.iter().chain(&self.heads).map(|t| values(&t.grad())).collect()
    }
}

fn batch() -> (Tensor, Tensor, Tensor) {
    let x = Tensor::from_slice(&[
        0.5f32, -1.0, 0.3, 1.2, 0.1, -0.4, -0.7, 0.8, 0.2, 0.0, -0.3, 1.1, 0.9, 0.6, -0.2, -1.1, 0.4, 0.7,
        0.3, -0.9, -0.5, 0.6, 0.2, 0.1,
    ])
    .reshape([8, 3]);
    let ya = Tensor::from_slice(&[1.0f32, -0.5, 0.3, 0.8, -1.2, 0.6, 0.2, -0.4]);
    let yb = &ya * -3.0;
    (x, ya, yb)
}

#[test]
fn fixed_is_the_gradient_of_the_weighted_sum() {
    let (x, ya, yb) = batch();
    let mut section = cfg(WeightingStrategy::Fixed);
    section.weights.cls = 0.5;
    section.weights.seg = 2.0;
    let toy = Toy::new();
    let mut weighting = TaskWeighting::new(&section, 0, Device::Cpu);
    let report = weighting.backward(&toy.losses(&x, &ya, &yb, 8.0), toy.params(), &mut LocalReducer).unwrap();
    assert_eq!(
        (report.weight_values().cls, report.weight_values().det, report.weight_values().seg),
        (Some(0.5), None, Some(2.0))
    );

    let reference = toy.copy();
    let l = reference.losses(&x, &ya, &yb, 8.0);
    let total = l.cls.unwrap() * 0.5 + l.seg.unwrap() * 2.0;
    assert!((report.total_loss_value() - total.double_value(&[])).abs() < 1e-6);
    total.backward();
    for (got, want) in toy.grads().iter().zip(reference.grads()) {
        assert_close(got, &want, 1e-7);
    }
}

#[test]
fn uncertainty_gradient_matches_the_closed_form() {
    // total = Σ exp(−s_t)·L_t + s_t, so ∂total/∂s_t = 1 − exp(−s_t)·L_t and
    // ∂total/∂θ = exp(−s_t)·∂L_t/∂θ.
    let mut weighting = TaskWeighting::new(&cfg(WeightingStrategy::Uncertainty), 0, Device::Cpu);
    let s = [0.3, 0.0, -0.2];
    weighting.load_state_dict(&[(LOG_VAR.into(), Tensor::from_slice(&s).to_kind(Kind::Float))]).unwrap();
    let theta = Tensor::from_slice(&[1.5f32, -0.5]).set_requires_grad(true);
    let (l_cls, l_seg) = (theta.get(0).square() * 0.5, theta.get(1).square() * 4.0); // 1.125, 1.0
    let losses = TaskLosses { cls: Some(l_cls), det: None, seg: Some(l_seg) };
    let report = weighting.backward(&losses, Params::default(), &mut LocalReducer).unwrap();

    let (e_cls, e_seg) = ((-0.3f64).exp(), 0.2f64.exp());
    assert_close(
        &[report.weight_values().cls.unwrap(), report.weight_values().seg.unwrap()],
        &[e_cls, e_seg],
        1e-6,
    );
    assert_close(&[report.total_loss_value()], &[e_cls * 1.125 + 0.3 + e_seg * 1.0 - 0.2], 1e-6);
    let params = weighting.parameters();
    assert_eq!(params.len(), 1);
    assert_close(&values(&params[0].1.grad()), &[1.0 - e_cls * 1.125, 0.0, 1.0 - e_seg * 1.0], 1e-6);
    // ∂L_cls/∂θ0 = θ0 = 1.5, ∂L_seg/∂θ1 = 8·θ1 = −4.
    assert_close(&values(&theta.grad()), &[e_cls * 1.5, e_seg * -4.0], 1e-6);
}

#[test]
fn dwa_weights_match_hand_computation() {
    let mut weighting = TaskWeighting::new(&cfg(WeightingStrategy::Dwa), 0, Device::Cpu);
    let theta = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
    let losses = || TaskLosses {
        cls: Some(theta.sum(Kind::Float)),
        det: Some(theta.sum(Kind::Float) * 2.0),
        seg: Some(theta.sum(Kind::Float) * 3.0),
    };
    let weights = |w: &mut TaskWeighting| {
        let r = w.backward(&losses(), Params::default(), &mut LocalReducer).unwrap().weight_values();
        vec![r.cls.unwrap(), r.det.unwrap(), r.seg.unwrap()]
    };
    assert_eq!(weights(&mut weighting), [1.0; 3], "1 before any epoch");
    // Epoch means from the steps' losses: (1, 2, 3) from two steps each.
    weighting
        .record_losses(&host_tensors(&TaskValues { cls: Some(0.5), det: Some(1.0), seg: Some(3.5) }))
        .unwrap();
    weighting
        .record_losses(&host_tensors(&TaskValues { cls: Some(1.5), det: Some(3.0), seg: Some(2.5) }))
        .unwrap();
    weighting.end_epoch().unwrap();
    assert_eq!(weights(&mut weighting), [1.0; 3], "1 after one epoch");
    weighting
        .record_losses(&host_tensors(&TaskValues { cls: Some(0.8), det: Some(1.9), seg: Some(2.4) }))
        .unwrap();
    assert_eq!(weights(&mut weighting), [1.0; 3], "recording does not change the epoch's weights");
    weighting.end_epoch().unwrap();
    // r = (0.8, 0.95, 0.8), T = 2: w = 3·softmax(r/2), by hand in f64:
    // e = [exp(.4), exp(.475), exp(.4)]; 3·e/Σe
    let want = [0.9746955547816033, 1.0506088904367932, 0.9746955547816033];
    assert_close(&weights(&mut weighting), &want, 1e-12);

    // A task missing from an epoch drops out; the two others share K = 2. The epoch is
    // checkpointed half way: the restored state carries the running sums.
    weighting
        .record_losses(&host_tensors(&TaskValues { cls: None, det: Some(1.7), seg: Some(1.92) }))
        .unwrap();
    let mut restored = TaskWeighting::new(&cfg(WeightingStrategy::Dwa), 0, Device::Cpu);
    restored.load_state_dict(&weighting.state_dict().unwrap()).unwrap();
    assert_close(&weights(&mut restored), &want, 1e-12);
    let mut weighting = restored;
    weighting
        .record_losses(&host_tensors(&TaskValues { cls: None, det: Some(1.9), seg: Some(1.92) }))
        .unwrap();
    weighting.end_epoch().unwrap();
    // r = (1.8/1.9, 1.92/2.4) = (0.947368.., 0.8); 2·softmax(r/2)
    let r = [1.8f64 / 1.9, 1.92 / 2.4];
    let e = [(r[0] / 2.0).exp(), (r[1] / 2.0).exp()];
    let w = weights(&mut weighting);
    assert_close(&w, &[1.0, 2.0 * e[0] / (e[0] + e[1]), 2.0 * e[1] / (e[0] + e[1])], 1e-12);
}

#[test]
fn pcgrad_projects_conflicting_gradients_as_in_the_paper() {
    let g = |v: [f32; 2]| Tensor::from_slice(&v);
    let orders = vec![vec![1], vec![0]];
    // g1·g2 = −1 < 0: g1' = g1 − (−1/1)·g2 = (0, 1); g2' = g2 − (−1/2)·g1 = (−0.5, 0.5).
    let sum = project_conflicts(&[g([1.0, 1.0]), g([-1.0, 0.0])], &orders).unwrap();
    assert_close(&values(&sum), &[-0.5, 1.5], 1e-7);
    // g1'·g2 = 0 and g2'·g1 = 0: each projection is orthogonal to the other original gradient.
    // Not conflicting (g1·g2 = 1 > 0): the plain sum.
    let sum = project_conflicts(&[g([1.0, 1.0]), g([1.0, 0.0])], &orders).unwrap();
    assert_close(&values(&sum), &[2.0, 1.0], 1e-7);
    // A zero gradient conflicts with nothing: no division by its zero norm reaches the sum.
    let sum = project_conflicts(&[g([1.0, -2.0]), g([0.0, 0.0])], &orders).unwrap();
    assert_eq!(values(&sum), [1.0, -2.0]);
}

#[test]
fn gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient() {
    // At the first step every L_i/L_i(0) is 1 (r_i = 1), so the target is the mean norm: the task
    // whose gradient at W is 4x larger must lose weight, the other gain it, sum staying 2.
    let mut section = cfg(WeightingStrategy::Gradnorm);
    section.gradnorm_lr = 0.01;
    let mut weighting = TaskWeighting::new(&section, 0, Device::Cpu);
    let w = Tensor::from_slice(&[0.5f32, -0.5, 0.25, 1.0]).reshape([2, 2]).set_requires_grad(true);
    let losses = || {
        let h = w.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
        TaskLosses { cls: Some(h.get(0) * 4.0 + 1.0), det: None, seg: Some(h.get(1) + 1.0) }
    };
    let report = weighting
        .backward(
            &losses(),
            Params { shared: std::slice::from_ref(&w), heads: &[], gradnorm_layer: Some(&w) },
            &mut LocalReducer,
        )
        .unwrap();
    assert_eq!(
        (report.weight_values().cls, report.weight_values().seg),
        (Some(1.0), Some(1.0)),
        "weights start at 1"
    );
    let state = weighting.state_dict().unwrap();
    let weights = values(&state.iter().find(|(n, _)| n == "weighting.gradnorm.weights").unwrap().1);
    // n_cls = ‖(4, 4, 0, 0)‖ = 5.657, n_seg = ‖(0, 0, 1, 1)‖ = 1.414; G = w·n, mean 3.536.
    // w_cls ← 1 − 0.01·5.657 = 0.9434, w_seg ← 1 + 0.01·1.414 = 1.0141; renormalised to sum 2.
    let (a, b) = (1.0 - 0.01 * 32f64.sqrt(), 1.0 + 0.01 * 2f64.sqrt());
    assert_close(&[weights[0], weights[2]], &[2.0 * a / (a + b), 2.0 * b / (a + b)], 1e-6);
    assert_eq!(weights[1], 1.0, "an absent task keeps its weight");
    // The model's gradient used the weights of this step (1, 1).
    assert_close(&values(&w.grad()), &[4.0, 4.0, 1.0, 1.0], 1e-6);
}

/// Per-task gradients of the toy on the whole batch by plain autograd, then the 2-task PCGrad
/// formula written out: the independent reference for the distributed test.
fn reference_pcgrad(toy: &Toy, x: &Tensor, ya: &Tensor, yb: &Tensor) -> Vec<Vec<f64>> {
    let l = toy.losses(x, ya, yb, 8.0);
    let inputs: Vec<&Tensor> = toy.shared.iter().chain(&toy.heads).collect();
    let flat = |g: &[Tensor]| Tensor::cat(&g[..2].iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
    let ga = Tensor::run_backward(&[l.cls.unwrap()], &inputs, true, false);
    let gb = Tensor::run_backward(&[l.seg.unwrap()], &inputs, false, false);
    let (a, b) = (flat(&ga), flat(&gb));
    let dot = a.dot(&b).double_value(&[]);
    assert!(dot < 0.0, "the toy's tasks conflict: {dot}");
    let pa = &a - &b * (dot / b.dot(&b).double_value(&[]));
    let pb = &b - &a * (dot / a.dot(&a).double_value(&[]));
    let shared = values(&(pa + pb));
    vec![shared[..12].to_vec(), shared[12..].to_vec(), values(&ga[2]), values(&gb[3])]
}

/// A reducer for ranks running on threads of one test: each deposits its tensors, all wait, each
/// takes the mean.
struct ThreadReducer {
    rank: usize,
    slots: Arc<Mutex<Vec<Vec<Tensor>>>>,
    barrier: Arc<Barrier>,
}

impl Reducer for ThreadReducer {
    fn all_reduce_mean(&mut self, tensors: &mut [Tensor]) -> Result<(), WorkerError> {
        self.slots.lock().unwrap()[self.rank] = tensors.iter().map(|t| t.detach().copy()).collect();
        self.barrier.wait();
        {
            let slots = self.slots.lock().unwrap();
            for (i, t) in tensors.iter_mut().enumerate() {
                let sum = slots.iter().map(|s| s[i].shallow_clone()).reduce(|a, b| a + b).unwrap();
                *t = sum / slots.len() as f64;
            }
        }
        self.barrier.wait();
        Ok(())
    }
}

#[test]
fn pcgrad_on_two_ranks_equals_one_process_on_the_whole_batch() {
    let (x, ya, yb) = batch();
    let base = Toy::new();
    let want = reference_pcgrad(&base.copy(), &x, &ya, &yb);

    // One process, whole batch.
    let single = base.copy();
    let mut weighting = TaskWeighting::new(&cfg(WeightingStrategy::Pcgrad), 7, Device::Cpu);
    weighting.backward(&single.losses(&x, &ya, &yb, 8.0), single.params(), &mut LocalReducer).unwrap();
    let got = single.grads();
    for (g, w) in got.iter().zip(&want) {
        assert_close(g, w, 1e-5);
    }

    // Two ranks with half the batch each. Each divides by the global count over the world size
    // (8 / 2), so the mean over ranks of their losses is the whole-batch loss.
    let world = 2;
    let slots = Arc::new(Mutex::new((0..world).map(|_| Vec::new()).collect::<Vec<_>>()));
    let barrier = Arc::new(Barrier::new(world));
    let rank_grads: Vec<Vec<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let toy = base.copy();
                let rows = |t: &Tensor| t.narrow(0, 4 * rank as i64, 4);
                let (x, ya, yb) = (rows(&x), rows(&ya), rows(&yb));
                let mut reducer = ThreadReducer { rank, slots: slots.clone(), barrier: barrier.clone() };
                scope.spawn(move || {
                    let mut weighting = TaskWeighting::new(&cfg(WeightingStrategy::Pcgrad), 7, Device::Cpu);
                    let losses = toy.losses(&x, &ya, &yb, 8.0 / world as f64);
                    weighting.backward(&losses, toy.params(), &mut reducer).unwrap();
                    toy.grads()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for rank in &rank_grads {
        // Shared gradients: already reduced and projected, identical on every rank.
        assert_close(&rank[0], &want[0], 1e-5);
        assert_close(&rank[1], &want[1], 1e-5);
    }
    // Head gradients: rank-local, equal to the whole batch's after the trainer's mean all-reduce.
    for p in 2..4 {
        let mean: Vec<f64> =
            rank_grads[0][p].iter().zip(&rank_grads[1][p]).map(|(a, b)| (a + b) / 2.0).collect();
        assert_close(&mean, &want[p], 1e-5);
    }
}

#[test]
fn pcgrad_task_order_is_seeded() {
    // Three tasks: the result depends on the order of projections, which depends only on
    // (seed, step).
    let run = |seed: u64| {
        let toy = Toy::new();
        let (x, ya, yb) = batch();
        let mut losses = toy.losses(&x, &ya, &yb, 8.0);
        losses.det = Some(toy.losses(&x, &(&ya * 2.0), &(&yb * -1.0), 8.0).seg.unwrap());
        let mut w = TaskWeighting::new(&cfg(WeightingStrategy::Pcgrad), seed, Device::Cpu);
        w.backward(&losses, toy.params(), &mut LocalReducer).unwrap();
        (toy.grads(), w.state_dict().unwrap())
    };
    let (a, state) = run(3);
    assert_eq!(a, run(3).0, "same seed, same gradients");
    assert!(
        (0..8).any(|seed| run(seed).0 != a),
        "the order matters for these gradients and follows the seed"
    );
    assert_eq!(values(&state[0].1), [1.0], "the step counter advanced");
}

#[test]
fn weighting_state_errors_name_the_entry() {
    let mut gn = TaskWeighting::new(&cfg(WeightingStrategy::Gradnorm), 0, Device::Cpu);
    let err = gn.load_state_dict(&[]).unwrap_err().to_string();
    assert!(err.contains("weighting.gradnorm.weights") && err.contains("missing"), "{err}");
    let mut fixed = TaskWeighting::new(&cfg(WeightingStrategy::Fixed), 0, Device::Cpu);
    let err = fixed.load_state_dict(&gn.state_dict().unwrap()).unwrap_err().to_string();
    assert!(err.contains("weighting.gradnorm"), "{err}");
    let err =
        fixed.backward(&TaskLosses::default(), Params::default(), &mut LocalReducer).unwrap_err().to_string();
    assert!(err.contains("no task loss"), "{err}");
}

/// The GPU check (`cargo test cuda_` where CUDA is): every strategy gives the same gradients and
/// weights on CUDA as on the CPU. Without CUDA there is nothing to compare.
#[test]
fn cuda_strategies_match_cpu() {
    if !tch::Cuda::is_available() {
        assert!(
            std::env::var_os("MTL_REQUIRE_CUDA").is_none(),
            "MTL_REQUIRE_CUDA is set but CUDA is not available"
        );
        return;
    }
    let (x, ya, yb) = batch();
    let base = Toy::new();
    for strategy in [
        WeightingStrategy::Fixed,
        WeightingStrategy::Uncertainty,
        WeightingStrategy::Dwa,
        WeightingStrategy::Gradnorm,
        WeightingStrategy::Pcgrad,
    ] {
        let run = |device: Device| {
            let toy = base.on(device);
            let (x, ya, yb) = (x.to_device(device), ya.to_device(device), yb.to_device(device));
            let mut w = TaskWeighting::new(&cfg(strategy), 5, device);
            let mut reports = Vec::new();
            for _ in 0..2 {
                let r = w.backward(&toy.losses(&x, &ya, &yb, 8.0), toy.params(), &mut LocalReducer).unwrap();
                let w = r.weight_values();
                reports.push(vec![w.cls.unwrap(), w.seg.unwrap(), r.total_loss_value()]);
            }
            let state: Vec<Vec<f64>> = w.state_dict().unwrap().iter().map(|(_, t)| values(t)).collect();
            (toy.grads(), reports, state)
        };
        let (cpu, cuda) = (run(Device::Cpu), run(Device::Cuda(0)));
        for (a, b) in cuda.0.iter().zip(&cpu.0).chain(cuda.1.iter().zip(&cpu.1)) {
            assert_close(a, b, 1e-5);
        }
        for (a, b) in cuda.2.iter().zip(&cpu.2) {
            let (a, b): (Vec<f64>, Vec<f64>) =
                a.iter().zip(b).filter(|(x, y)| !(x.is_nan() && y.is_nan())).map(|(x, y)| (*x, *y)).unzip();
            assert_close(&a, &b, 1e-5);
        }
    }
}
