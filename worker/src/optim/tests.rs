//! The optimisers against PyTorch 2.11. `reference.py` (next to this file) produced every
//! expected value below; run it with the project venv's python to regenerate them:
//!
//! ```text
//! $ .venv/bin/python worker/src/optim/reference.py
//! [0.014378192834556103, -0.028756385669112206, 0.2509858310222626, 0.37344667315483093, 0.4543372392654419, -0.5352278351783752] [-0.04016000032424927, 0.09704000502824783]
//! [-0.03524869680404663, 0.07049739360809326, 0.2226022332906723, 0.35809463262557983, 0.42791739106178284, -0.49774014949798584] [-0.06964399665594101, 0.16583599150180817]
//! [-0.02744544856250286, -0.0708625391125679, 0.1691705584526062, 0.2674785256385803, 0.3657865524291992, -0.4640945792198181] [-0.1164790689945221, 0.10647908598184586]
//! [0.03333333333333333, 0.06666666666666667, 0.1, 0.1, 0.09554359905560886, 0.08305704108364301, 0.06501344202803415, 0.04498655797196586, 0.026942958916356993, 0.014456400944391143]
//! 6.1288251876831055 [0.978980302810669, -1.3053070306777954, 0.32632675766944885, 0.16316337883472443, 0.6526535153388977, -0.4894901514053345] [0.32632675766944885, -0.6526535153388977, 0.08158168941736221, 0.0]
//! ```
//!
//! The script's core, for reading here: a 2x3 weight (decayed) and a 2-vector bias (not
//! decayed: PyTorch gets it as a second param group with `weight_decay=0`) take three steps
//! with gradients `GW·s`, `GB·s` for `s` in `[1, -0.5, 2]` and learning rates `[0.1, 0.05, 0.02]`:
//!
//! ```python
//! run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1))
//! run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1))
//! run(lambda p: torch.optim.AdamW(p, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))
//! ```
use tch::{Device, Kind, Tensor};

use super::*;

const W0: [f32; 6] = [0.1, -0.2, 0.3, 0.4, 0.5, -0.6];
const B0: [f32; 2] = [0.01, -0.02];
const GW: [f32; 6] = [0.5, -1.0, 0.25, 0.1, 0.2, -0.3];
const GB: [f32; 2] = [0.3, -0.7];
const SCALES: [f64; 3] = [1.0, -0.5, 2.0];
const LRS: [f64; 3] = [0.1, 0.05, 0.02];

fn fresh_params() -> Vec<(String, Tensor)> {
    fresh_params_on(Device::Cpu)
}

fn fresh_params_on(device: Device) -> Vec<(String, Tensor)> {
    vec![
        (
            "layer.weight".into(),
            Tensor::from_slice(&W0).reshape([2, 3]).to_device(device).set_requires_grad(true),
        ),
        ("layer.bias".into(), Tensor::from_slice(&B0).to_device(device).set_requires_grad(true)),
    ]
}

/// Sets the fixed gradients of step `i` (as `backward` of `Σ p·g` would).
fn set_grads(params: &[(String, Tensor)], i: usize) {
    let device = params[0].1.device();
    let gw = Tensor::from_slice(&GW).reshape([2, 3]).to_device(device) * SCALES[i];
    let gb = Tensor::from_slice(&GB).to_device(device) * SCALES[i];
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    ((&params[0].1 * gw).sum(Kind::Float) + (&params[1].1 * gb).sum(Kind::Float)).backward();
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w} (all: {got:?})");
    }
}

fn run(make: impl Fn(Vec<(String, Tensor)>) -> Optimizer, steps: std::ops::Range<usize>) -> Vec<f64> {
    run_on(make, steps, Device::Cpu)
}

fn run_on(
    make: impl Fn(Vec<(String, Tensor)>) -> Optimizer,
    steps: std::ops::Range<usize>,
    device: Device,
) -> Vec<f64> {
    let params = fresh_params_on(device);
    let mut opt = make(params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    for i in steps {
        set_grads(&params, i);
        opt.step(LRS[i]).unwrap();
    }
    [values(&params[0].1), values(&params[1].1)].concat()
}

/// Builds an optimiser over given parameters.
type Make = Box<dyn Fn(Vec<(String, Tensor)>) -> Optimizer>;

fn makers() -> [Make; 3] {
    [Box::new(sgd(false)), Box::new(sgd(true)), Box::new(adamw)]
}

fn sgd(nesterov: bool) -> impl Fn(Vec<(String, Tensor)>) -> Optimizer {
    move |p| Optimizer::Sgd(Sgd::new(p, SgdConfig { momentum: 0.9, nesterov, weight_decay: 0.1 }).unwrap())
}

fn adamw(p: Vec<(String, Tensor)>) -> Optimizer {
    Optimizer::AdamW(
        AdamW::new(p, AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1 }).unwrap(),
    )
}

#[test]
fn sgd_momentum_weight_decay_matches_pytorch() {
    let want = [
        0.014378192834556103,
        -0.028756385669112206,
        0.2509858310222626,
        0.37344667315483093,
        0.4543372392654419,
        -0.5352278351783752,
        -0.04016000032424927,
        0.09704000502824783,
    ];
    assert_close(&run(sgd(false), 0..3), &want, 1e-6);
}

#[test]
fn sgd_nesterov_matches_pytorch() {
    let want = [
        -0.03524869680404663,
        0.07049739360809326,
        0.2226022332906723,
        0.35809463262557983,
        0.42791739106178284,
        -0.49774014949798584,
        -0.06964399665594101,
        0.16583599150180817,
    ];
    assert_close(&run(sgd(true), 0..3), &want, 1e-6);
}

#[test]
fn adamw_matches_pytorch() {
    let want = [
        -0.02744544856250286,
        -0.0708625391125679,
        0.1691705584526062,
        0.2674785256385803,
        0.3657865524291992,
        -0.4640945792198181,
        -0.1164790689945221,
        0.10647908598184586,
    ];
    assert_close(&run(adamw, 0..3), &want, 1e-6);
}

#[test]
fn schedule_matches_pytorch_sequential_lr() {
    let want = [
        0.03333333333333333,
        0.06666666666666667,
        0.1,
        0.1,
        0.09554359905560886,
        0.08305704108364301,
        0.06501344202803415,
        0.04498655797196586,
        0.026942958916356993,
        0.014456400944391143,
    ];
    let schedule = Schedule { lr: 0.1, warmup_steps: 3, total_steps: 10, min_lr_ratio: 0.1 };
    let got: Vec<f64> = (0..10).map(|s| schedule.lr(s)).collect();
    assert_close(&got, &want, 1e-12);
    assert!((schedule.lr(10) - 0.01).abs() < 1e-12, "ends at min_lr_ratio · lr");
    let flat = Schedule { lr: 0.5, warmup_steps: 0, total_steps: 4, min_lr_ratio: 1.0 };
    assert!((0..6).all(|s| flat.lr(s) == 0.5), "min_lr_ratio 1 is a constant rate");
}

#[test]
fn clip_grad_norm_matches_pytorch() {
    let a = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let c = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let ga = Tensor::from_slice(&[3.0f32, -4.0, 1.0, 0.5, 2.0, -1.5]).reshape([2, 3]);
    let gc = Tensor::from_slice(&[1.0f32, -2.0, 0.25, 0.0]);
    ((&a * &ga).sum(Kind::Float) + (&c * &gc).sum(Kind::Float)).backward();
    let unused = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let norm =
        clip_grad_norm(&[a.shallow_clone(), unused, c.shallow_clone()], 2.0).unwrap().double_value(&[]);
    assert!((norm - 6.1288251876831055).abs() < 1e-5, "{norm}");
    let want_a = [
        0.978980302810669,
        -1.3053070306777954,
        0.32632675766944885,
        0.16316337883472443,
        0.6526535153388977,
        -0.4894901514053345,
    ];
    assert_close(&values(&a.grad()), &want_a, 1e-6);
    assert_close(
        &values(&c.grad()),
        &[0.32632675766944885, -0.6526535153388977, 0.08158168941736221, 0.0],
        1e-6,
    );
    let norm = clip_grad_norm(&[a.shallow_clone(), c.shallow_clone()], 10.0).unwrap().double_value(&[]);
    assert!((norm - 2.0).abs() < 1e-5, "already clipped: {norm}");
    assert_close(&values(&a.grad()), &want_a, 1e-6);
}

#[test]
fn state_dict_round_trip_continues_identically() {
    for make in makers() {
        let uninterrupted = run(&make, 0..3);
        // Two steps, save, then a fresh optimiser over the saved parameters takes the third.
        let params = fresh_params();
        let mut opt = make(params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        for (i, &lr) in LRS.iter().enumerate().take(2) {
            set_grads(&params, i);
            opt.step(lr).unwrap();
        }
        let state = opt.state_dict();
        let resumed: Vec<(String, Tensor)> =
            params.iter().map(|(n, t)| (n.clone(), t.detach().copy().set_requires_grad(true))).collect();
        let mut fresh = make(resumed.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        fresh.load_state_dict(&state).unwrap();
        assert_eq!(fresh.steps(), 2);
        set_grads(&resumed, 2);
        fresh.step(LRS[2]).unwrap();
        let got = [values(&resumed[0].1), values(&resumed[1].1)].concat();
        assert_eq!(got, uninterrupted, "resumed run equals the uninterrupted one");
    }
}

#[test]
fn load_state_dict_names_missing_and_mismatched_entries() {
    let mut opt = adamw(fresh_params());
    let mut state = opt.state_dict();
    state.retain(|(n, _)| n != "layer.bias.exp_avg_sq");
    let err = opt.load_state_dict(&state).unwrap_err().to_string();
    assert!(err.contains("layer.bias.exp_avg_sq") && err.contains("missing"), "{err}");

    let mut state = opt.state_dict();
    state[0].1 = Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu));
    let err = opt.load_state_dict(&state).unwrap_err().to_string();
    assert!(err.contains("layer.weight.exp_avg") && err.contains("[3, 2]"), "{err}");

    let mut sgd = sgd(false)(fresh_params());
    let err = sgd.load_state_dict(&opt.state_dict()).unwrap_err().to_string();
    assert!(err.contains("exp_avg"), "an AdamW state does not load into SGD: {err}");
}

#[test]
fn decay_skips_biases_and_one_dimensional_tensors() {
    let t2 = Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu));
    let t1 = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    assert!(decays("conv.weight", &t2));
    assert!(!decays("bn.weight", &t1));
    assert!(!decays("fc.bias", &t1));
}

#[test]
fn from_config_builds_the_configured_optimizer() {
    let mut train = mtl_job::TrainSection { optimizer: mtl_job::OptimizerKind::Adamw, ..Default::default() };
    assert!(matches!(Optimizer::from_config(&train, fresh_params()).unwrap(), Optimizer::AdamW(_)));
    train.optimizer = mtl_job::OptimizerKind::Sgd;
    assert!(matches!(Optimizer::from_config(&train, fresh_params()).unwrap(), Optimizer::Sgd(_)));
}

/// A learning rate given as a 0-dim tensor on the parameters' device (what a captured CUDA
/// graph of the step reads) updates as the same value given as a number, and the replayed-step
/// count keeps `steps` in line with the updates.
#[test]
fn a_learning_rate_tensor_updates_as_its_value() {
    let devices =
        if tch::Cuda::is_available() { vec![Device::Cpu, Device::Cuda(0)] } else { vec![Device::Cpu] };
    for device in devices {
        for make in makers() {
            let want = run_on(&make, 0..3, device);
            let params = fresh_params_on(device);
            let mut opt = make(params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
            let mut lr = Tensor::zeros([], (Kind::Float, device));
            for (i, &value) in LRS.iter().enumerate().take(3) {
                set_grads(&params, i);
                let _ = lr.fill_(value);
                opt.step(Lr::Tensor(&lr)).unwrap();
            }
            // f32 learning rates against f64 ones.
            assert_close(&[values(&params[0].1), values(&params[1].1)].concat(), &want, 1e-6);
            assert_eq!(opt.steps(), 3);
            opt.count_replayed_step();
            assert_eq!(opt.steps(), 4);
        }
    }
}

/// The GPU check (`cargo test cuda_` where CUDA is): the same updates on CUDA match the CPU's,
/// and a state saved on the GPU resumes on the CPU. Without CUDA there is nothing to compare.
#[test]
fn cuda_updates_match_cpu_and_state_moves_across_devices() {
    if !tch::Cuda::is_available() {
        assert!(
            std::env::var_os("MTL_REQUIRE_CUDA").is_none(),
            "MTL_REQUIRE_CUDA is set but CUDA is not available"
        );
        return;
    }
    let cuda = Device::Cuda(0);
    for make in makers() {
        let cpu = run(&make, 0..3);
        assert_close(&run_on(&make, 0..3, cuda), &cpu, 1e-6);

        let params = fresh_params_on(cuda);
        let mut opt = make(params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        for (i, &lr) in LRS.iter().enumerate().take(2) {
            set_grads(&params, i);
            opt.step(lr).unwrap();
        }
        let resumed: Vec<(String, Tensor)> = params
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).set_requires_grad(true)))
            .collect();
        let mut on_cpu = make(resumed.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        on_cpu.load_state_dict(&opt.state_dict()).unwrap();
        set_grads(&resumed, 2);
        on_cpu.step(LRS[2]).unwrap();
        assert_close(&[values(&resumed[0].1), values(&resumed[1].1)].concat(), &cpu, 1e-6);
    }
    let a = Tensor::zeros([3], (Kind::Float, cuda)).set_requires_grad(true);
    (&a * Tensor::from_slice(&[3.0f32, 4.0, 0.0]).to_device(cuda)).sum(Kind::Float).backward();
    assert!((clip_grad_norm(&[a.shallow_clone()], 1.0).unwrap().double_value(&[]) - 5.0).abs() < 1e-5);
    assert_close(&values(&a.grad()), &[0.6, 0.8, 0.0], 1e-6);
}

/// The per-parameter updates the optimisers made before they used the fused kernels (one
/// parameter at a time, the AdamW step count read on the host), kept as the reference that the
/// fused ones must equal.
mod per_parameter {
    use tch::Tensor;

    use super::super::{AdamWConfig, Param, SgdConfig};

    pub(super) fn sgd_step(params: &[Param], buffers: &mut [Tensor], cfg: SgdConfig, lr: f64) {
        let _guard = tch::no_grad_guard();
        let SgdConfig { momentum, nesterov, weight_decay } = cfg;
        for (i, p) in params.iter().enumerate() {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            let mut d_p = if p.decay && weight_decay != 0.0 { grad + &p.tensor * weight_decay } else { grad };
            if momentum != 0.0 {
                let buf = &mut buffers[i];
                let _ = buf.f_mul_scalar_(momentum).unwrap().f_add_(&d_p).unwrap();
                d_p = if nesterov { d_p + &*buf * momentum } else { buf.shallow_clone() };
            }
            let _ = p.tensor.shallow_clone().f_sub_(&(d_p * lr)).unwrap();
        }
    }

    /// `state[i]` = (exp_avg, exp_avg_sq, step count) of parameter `i`.
    pub(super) fn adamw_step(
        params: &[Param],
        state: &mut [(Tensor, Tensor, i32)],
        cfg: AdamWConfig,
        lr: f64,
    ) {
        let _guard = tch::no_grad_guard();
        let AdamWConfig { betas: [beta1, beta2], eps, weight_decay } = cfg;
        for (p, (exp_avg, exp_avg_sq, t)) in params.iter().zip(state) {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            *t += 1;
            let mut param = p.tensor.shallow_clone();
            if p.decay && weight_decay != 0.0 {
                let _ = param.f_mul_scalar_(1.0 - lr * weight_decay).unwrap();
            }
            let _ = exp_avg.f_lerp_(&grad, 1.0 - beta1).unwrap();
            let _ =
                exp_avg_sq.f_mul_scalar_(beta2).unwrap().f_addcmul_(&(&grad * (1.0 - beta2)), &grad).unwrap();
            let bias_correction1 = 1.0 - beta1.powi(*t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(*t)).sqrt();
            let denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps;
            let _ = param.f_sub_(&((&*exp_avg / &denom) * (lr / bias_correction1))).unwrap();
        }
    }
}

/// Parameters of mixed shapes (conv weight, biases, a 1-D scale, a 0-dim scalar, a matrix) with
/// random values; the last two get gradients late or never.
fn mixed_params(seed: i64) -> Vec<(String, Tensor)> {
    // Under the generator's lock, so the same seed gives the same values while other tests draw.
    crate::model::with_seed(seed, || {
        let shapes: [(&str, &[i64]); 7] = [
            ("conv.weight", &[4, 3, 3, 3]),
            ("conv.bias", &[4]),
            ("bn.weight", &[4]),
            ("task.log_var", &[]),
            ("fc.weight", &[5, 6]),
            ("late.weight", &[2, 3]),
            ("unused.bias", &[3]),
        ];
        shapes
            .iter()
            .map(|(name, shape)| {
                (name.to_string(), Tensor::randn(*shape, (Kind::Float, Device::Cpu)).set_requires_grad(true))
            })
            .collect()
    })
}

/// Copies of `params` (same values, fresh leaves without gradients).
fn copies(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params.iter().map(|(n, t)| (n.clone(), t.detach().copy().set_requires_grad(true))).collect()
}

/// Gives the parameters of both sets the gradients `grads` (index-aligned; `None` leaves a
/// gradient as it is: undefined if it never had one).
fn give_grads(sets: [&[(String, Tensor)]; 2], grads: &[Option<Tensor>]) {
    for set in sets {
        let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for ((_, p), g) in set.iter().zip(grads) {
            if let Some(g) = g {
                let mut old = p.grad();
                if old.defined() {
                    let _ = old.zero_();
                }
                loss += (p * g).sum(Kind::Float);
            }
        }
        loss.backward();
    }
}

#[test]
fn fused_updates_equal_the_per_parameter_updates_over_several_steps() {
    enum Case {
        Sgd(SgdConfig),
        AdamW(AdamWConfig),
    }
    let cases = [
        Case::Sgd(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 0.05 }),
        Case::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.05 }),
        Case::Sgd(SgdConfig { momentum: 0.0, nesterov: false, weight_decay: 0.05 }),
        Case::AdamW(AdamWConfig { betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.1 }),
    ];
    for (case, config) in cases.iter().enumerate() {
        let fused_params = mixed_params(7);
        let ref_params = copies(&fused_params);
        let named = |ps: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
            ps.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
        };
        let mut opt = match *config {
            Case::Sgd(cfg) => Optimizer::Sgd(Sgd::new(named(&fused_params), cfg).unwrap()),
            Case::AdamW(cfg) => Optimizer::AdamW(AdamW::new(named(&fused_params), cfg).unwrap()),
        };
        let reference = params(named(&ref_params));
        let mut buffers: Vec<Tensor> = reference.iter().map(|p| p.tensor.zeros_like()).collect();
        let mut moments: Vec<(Tensor, Tensor, i32)> =
            reference.iter().map(|p| (p.tensor.zeros_like(), p.tensor.zeros_like(), 0)).collect();
        for (step, lr) in [0.1, 0.05, 0.2, 0.02, 0.1].into_iter().enumerate() {
            // Every draw from LibTorch's one generator under its lock (`with_seed`).
            let grads: Vec<Option<Tensor>> = crate::model::with_seed(100 * case as i64 + step as i64, || {
                fused_params
                    .iter()
                    .map(|(name, p)| match name.as_str() {
                        "unused.bias" => None,
                        "late.weight" if step < 2 => None,
                        _ => Some(Tensor::randn(p.size(), (Kind::Float, Device::Cpu))),
                    })
                    .collect()
            });
            give_grads([&fused_params, &ref_params], &grads);
            opt.step(lr).unwrap();
            match *config {
                Case::Sgd(cfg) => per_parameter::sgd_step(&reference, &mut buffers, cfg, lr),
                Case::AdamW(cfg) => per_parameter::adamw_step(&reference, &mut moments, cfg, lr),
            }
            for ((name, got), (_, want)) in fused_params.iter().zip(&ref_params) {
                let (got, want) = (values(got), values(want));
                let tol: Vec<f64> = want.iter().map(|w| 1e-6 * w.abs().max(1.0)).collect();
                for (i, ((g, w), t)) in got.iter().zip(&want).zip(&tol).enumerate() {
                    assert!(
                        (g - w).abs() <= *t,
                        "case {case} step {step} {name}[{i}]: fused {g}, reference {w}"
                    );
                }
            }
        }
        // The parameter without a gradient never moved; AdamW counted per parameter.
        assert_eq!(values(&fused_params[6].1), values(&mixed_params(7)[6].1));
        if let Case::AdamW(_) = config {
            let state = opt.state_dict();
            let step_of = |name: &str| {
                let t = &state.iter().find(|(n, _)| n == &format!("{name}.step")).unwrap().1;
                assert_eq!((t.kind(), t.device(), t.size()), (Kind::Int64, Device::Cpu, vec![]));
                t.int64_value(&[])
            };
            assert_eq!((step_of("conv.weight"), step_of("late.weight"), step_of("unused.bias")), (5, 3, 0));
            assert_eq!(moments.iter().map(|m| m.2).collect::<Vec<_>>(), [5, 5, 5, 5, 5, 3, 0]);
        }
    }
}

#[test]
fn foreach_ops_match_per_tensor_ops() {
    let shapes: [&[i64]; 4] = [&[4, 3, 3, 3], &[4], &[], &[0]];
    let tensors: Vec<Tensor> = crate::model::with_seed(3, || {
        shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect()
    });
    let before: Vec<Vec<f64>> = tensors.iter().map(values).collect();

    let norms = fused::foreach_norm(&tensors).unwrap();
    assert_eq!(norms.len(), tensors.len());
    for (n, t) in norms.iter().zip(&tensors) {
        assert_eq!((n.size(), n.kind()), (vec![], Kind::Float));
        assert_close(&values(n), &values(&t.norm()), 1e-6);
    }

    let half = Tensor::from(0.5f32);
    fused::foreach_mul_(&tensors, &half).unwrap();
    for (t, b) in tensors.iter().zip(&before) {
        assert_eq!(values(t), b.iter().map(|v| ((*v as f32) * 0.5) as f64).collect::<Vec<_>>());
    }
    let refs: Vec<&Tensor> = tensors.iter().collect();
    fused::foreach_add_(&refs, 1.0).unwrap();
    for (t, b) in tensors.iter().zip(&before) {
        assert_eq!(values(t), b.iter().map(|v| ((*v as f32) * 0.5 + 1.0) as f64).collect::<Vec<_>>());
    }
    fused::foreach_zero_(&tensors).unwrap();
    assert!(tensors.iter().all(|t| values(t).iter().all(|v| *v == 0.0)));

    // Empty lists are no calls; LibTorch's errors come back as errors naming the op.
    let none: [Tensor; 0] = [];
    assert!(fused::foreach_norm(&none).unwrap().is_empty());
    fused::foreach_zero_(&none).unwrap();
    let err = fused::foreach_mul_(&tensors, &Tensor::ones([2], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(err.to_string().contains("_foreach_mul_"), "{err}");
    let err = fused::sgd_(
        &tensors,
        &tensors[..1],
        &tensors,
        fused::SgdHyper { lr: 0.1.into(), momentum: 0.9, nesterov: false, weight_decay: 0.0 },
    )
    .unwrap_err();
    assert!(err.to_string().contains("1 gradients, expected 4"), "{err}");
}

#[test]
fn zero_grad_zeroes_every_defined_gradient() {
    let params = mixed_params(11);
    let mut opt = adamw(params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
    let grads: Vec<Option<Tensor>> =
        params.iter().take(5).map(|(_, p)| Some(p.ones_like())).chain([None, None]).collect();
    let others = copies(&params);
    give_grads([&params, &others], &grads);
    opt.zero_grad().unwrap();
    for (name, p) in &params[..5] {
        assert!(values(&p.grad()).iter().all(|v| *v == 0.0), "{name}");
    }
    assert!(!params[5].1.grad().defined() && !params[6].1.grad().defined(), "undefined stay undefined");
}
