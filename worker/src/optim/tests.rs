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
