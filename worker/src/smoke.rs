//! The smallest real training step: a tiny conv net on random 32x32 images, one SGD step.
//! Used by `worker run` until the multi-task trainer takes over; it proves LibTorch is
//! linked, runs forward and backward, and that its loss reaches the coordinator.
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Runs one optimisation step and returns the loss before the step.
pub fn tiny_step(seed: u64, device: Device, batch: i64, lr: f64) -> Result<f64, tch::TchError> {
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::conv2d(
            &root / "conv1",
            3,
            8,
            3,
            nn::ConvConfig { stride: 2, padding: 1, ..Default::default() },
        ))
        .add_fn(|x| x.relu())
        .add(nn::conv2d(
            &root / "conv2",
            8,
            16,
            3,
            nn::ConvConfig { stride: 2, padding: 1, ..Default::default() },
        ))
        .add_fn(|x| x.relu().adaptive_avg_pool2d([1, 1]).flatten(1, -1))
        .add(nn::linear(&root / "fc", 16, 10, Default::default()));
    let images = Tensor::f_randn([batch, 3, 32, 32], (Kind::Float, device))?;
    let labels = Tensor::f_randint(10, [batch], (Kind::Int64, device))?;
    let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, lr)?;
    opt.zero_grad();
    let loss = net.forward(&images).f_log_softmax(-1, Kind::Float)?.f_nll_loss(
        &labels,
        None::<Tensor>,
        tch::Reduction::Mean,
        -100,
    )?;
    loss.f_backward()?;
    opt.step();
    loss.f_double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_gives_a_finite_loss_near_log10_and_is_seeded() {
        let a = tiny_step(3, Device::Cpu, 4, 0.1).unwrap();
        let b = tiny_step(3, Device::Cpu, 4, 0.1).unwrap();
        assert_eq!(a, b, "same seed, same loss");
        // Random init, 10 classes: cross-entropy starts near ln(10) = 2.30.
        assert!(a.is_finite() && (1.5..3.5).contains(&a), "loss {a}");
    }
}
