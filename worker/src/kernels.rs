//! GPU kernel choices through the C++ shim in `worker/shim/kernels.cpp` (tch 0.24 exposes
//! neither): cuDNN's autotuner (`train.cudnn_benchmark`) and the channels_last memory format
//! for convolution weights and input images (`train.channels_last`). Both change only how
//! kernels run, not what they compute (up to floating-point summation order).
use std::ffi::c_int;

use mtl_job::TrainSection;
use tch::Tensor;
use torch_sys::C_tensor;

use crate::model::MultiTaskModel;
use crate::WorkerError;

extern "C" {
    fn mtl_set_cudnn_benchmark(on: c_int) -> c_int;
    #[cfg(test)]
    fn mtl_cudnn_benchmark(on: *mut c_int) -> c_int;
    fn mtl_channels_last(t: *const C_tensor, out: *mut *mut C_tensor) -> c_int;
    #[cfg(test)]
    fn mtl_is_channels_last(t: *const C_tensor, yes: *mut c_int) -> c_int;
    fn mtl_set_mkldnn(on: c_int) -> c_int;
}

/// Applies `train.cudnn_benchmark` (on CUDA only: it is a process-wide switch that CPU
/// convolutions ignore) and `train.channels_last` to `model`, before an optimizer takes its
/// parameters.
///
/// On CPU, channels_last also turns LibTorch's oneDNN kernels off for the process: with
/// channels_last weights, oneDNN's 1x1 convolution backward (LibTorch 2.11, AVX-512) corrupted
/// memory in our model's backward pass; LibTorch's own kernels compute it right, more slowly.
/// channels_last is for GPUs; on CPU it is there to check the layout.
pub(crate) fn apply(train: &TrainSection, model: &mut MultiTaskModel) -> Result<(), WorkerError> {
    let cuda = model.var_store().device().is_cuda();
    if cuda {
        set_cudnn_benchmark(train.cudnn_benchmark)?;
    }
    if train.channels_last {
        if !cuda {
            tracing::warn!("train.channels_last on CPU: oneDNN kernels off (slower; meant for GPUs)");
            set_mkldnn(false)?;
        }
        to_channels_last(model)?;
    }
    Ok(())
}

/// Turns LibTorch's oneDNN CPU kernels on or off for this process.
fn set_mkldnn(on: bool) -> Result<(), WorkerError> {
    // SAFETY: no pointers; the shim catches every C++ exception.
    match unsafe { mtl_set_mkldnn(c_int::from(on)) } {
        0 => Ok(()),
        _ => Err(shim_error("could not switch oneDNN")),
    }
}

/// Turns cuDNN's benchmark mode on or off for this process.
pub(crate) fn set_cudnn_benchmark(on: bool) -> Result<(), WorkerError> {
    // SAFETY: no pointers; the shim catches every C++ exception.
    match unsafe { mtl_set_cudnn_benchmark(c_int::from(on)) } {
        0 => Ok(()),
        _ => Err(shim_error("could not set cuDNN's benchmark mode")),
    }
}

/// Whether cuDNN's benchmark mode is on.
#[cfg(test)]
pub(crate) fn cudnn_benchmark() -> bool {
    let mut on = 0;
    // SAFETY: the shim writes one int and catches every C++ exception.
    unsafe { mtl_cudnn_benchmark(&mut on) };
    on != 0
}

/// Lays out every 4-D variable of `model` (the convolution weights) channels_last, in place
/// (`set_data`: the same tensors, so optimizers and checkpoints keep them), and makes its
/// forward pass lay out the input images the same way.
pub(crate) fn to_channels_last(model: &mut MultiTaskModel) -> Result<(), WorkerError> {
    for (_, mut var) in model.var_store().variables() {
        if var.dim() == 4 {
            let data = channels_last(&var.f_detach()?)?;
            tch::no_grad(|| var.set_data(&data));
        }
    }
    model.set_channels_last(true);
    Ok(())
}

/// `t` (4-D) in channels_last memory format: NHWC strides, the same values.
pub(crate) fn channels_last(t: &Tensor) -> Result<Tensor, WorkerError> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `t` is a live tensor; on success the shim hands over a new handle, which
    // `from_ptr` owns.
    match unsafe { mtl_channels_last(t.as_ptr(), &mut out) } {
        0 => Ok(unsafe { Tensor::from_ptr(out) }),
        _ => Err(shim_error(&format!("could not lay out a {:?} tensor channels_last", t.size()))),
    }
}

/// Whether `t` is laid out channels_last.
#[cfg(test)]
pub(crate) fn is_channels_last(t: &Tensor) -> bool {
    let mut yes = 0;
    // SAFETY: `t` is a live tensor; the shim writes one int and catches every C++ exception.
    unsafe { mtl_is_channels_last(t.as_ptr(), &mut yes) };
    yes != 0
}

fn shim_error(message: &str) -> WorkerError {
    WorkerError::TorchAt { at: "kernels".into(), source: tch::TchError::Torch(message.into()) }
}

#[cfg(test)]
mod tests {
    use mtl_job::{JobConfig, TasksSection};
    use tch::{Device, Tensor};

    use super::*;
    use crate::collective::LocalCollective;
    use crate::data::{open_dataset, Loader, LoaderConfig, OrderedSplit, Split};
    use crate::tasks::tests::{test_batch, test_model};
    use crate::train::losses::{build_targets, host_counts, task_losses};
    use crate::train::Trainer;

    /// The sum of the task losses of `model` on `batch`, and every parameter's gradient.
    fn loss_and_grads(
        model: &MultiTaskModel,
        batch: &crate::data::Batch,
    ) -> (Vec<Tensor>, Vec<(String, Tensor)>) {
        let targets = build_targets(model, batch).unwrap();
        let normalisers = host_counts(batch, &targets).normalisers(Device::Cpu);
        let out = model.forward(&batch.images, true).unwrap();
        let mut outputs =
            vec![out.cls.as_ref().unwrap().shallow_clone(), out.seg.as_ref().unwrap().shallow_clone()];
        let det = out.det.as_ref().unwrap();
        outputs
            .extend(det.cls_logits.iter().chain(&det.ltrb).chain(&det.centerness).map(Tensor::shallow_clone));
        let losses = task_losses(&out, batch, &targets, &normalisers).unwrap();
        let total = losses.iter().map(|(_, l)| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
        total.backward();
        let grads = model.parameters().into_iter().map(|(n, p)| (n, p.grad())).collect();
        (outputs.into_iter().map(|t| t.detach()).collect(), grads)
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        let scale = a.abs().max().double_value(&[]);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale + 1e-7, "{what}: max |difference| {diff} at scale {scale}");
    }

    /// Runs the ignored test `name` in a process of its own: channels_last on CPU turns oneDNN
    /// off for the whole process (see [`apply`]), which must not change the kernels of tests
    /// running next to it.
    fn in_own_process(name: &str) {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{name}:\n{text}");
    }

    #[test]
    fn channels_last_matches_nchw() {
        in_own_process("kernels::tests::a_channels_last_model_computes_what_the_nchw_one_does");
        in_own_process("kernels::tests::training_steps_channels_last_track_nchw_steps");
    }

    #[test]
    #[ignore = "run in a process of its own by channels_last_matches_nchw"]
    fn a_channels_last_model_computes_what_the_nchw_one_does() {
        set_mkldnn(false).unwrap();
        let nchw = test_model(&TasksSection::default());
        let mut nhwc = test_model(&TasksSection::default());
        to_channels_last(&mut nhwc).unwrap();
        let convs: Vec<(String, Tensor)> =
            nhwc.var_store().variables().into_iter().filter(|(_, v)| v.dim() == 4).collect();
        assert!(!convs.is_empty());
        for (name, var) in &convs {
            assert!(is_channels_last(var), "{name} is laid out channels_last");
            assert!(var.requires_grad(), "{name} is still trained");
        }
        // The parameter lists hold the same tensors (set_data kept their identity).
        let first = &nhwc.parameters()[0];
        assert!(nhwc.var_store().variables()[&first.0].data_ptr() == first.1.data_ptr());

        let batch = test_batch(&[(true, true, true); 3], 5);
        let (out_a, grads_a) = loss_and_grads(&nchw, &batch);
        let (out_b, grads_b) = loss_and_grads(&nhwc, &batch);
        for (i, (a, b)) in out_a.iter().zip(&out_b).enumerate() {
            assert_close(a, b, &format!("output {i}"));
        }
        assert_eq!(grads_a.len(), grads_b.len());
        for ((name, a), (_, b)) in grads_a.iter().zip(&grads_b) {
            assert!(a.defined() && b.defined(), "{name} has a gradient");
            assert_close(a, b, &format!("gradient of {name}"));
        }
    }

    #[test]
    fn cudnn_benchmark_is_switched_through_the_shim() {
        let before = cudnn_benchmark();
        set_cudnn_benchmark(true).unwrap();
        assert!(cudnn_benchmark());
        set_cudnn_benchmark(false).unwrap();
        assert!(!cudnn_benchmark());
        set_cudnn_benchmark(before).unwrap();
    }

    /// A tiny job on synthetic data in `dir`.
    fn job(dir: &std::path::Path, extra: &str) -> JobConfig {
        JobConfig::from_toml(&format!(
            "[job]\nname = \"cl\"\n[data]\nformat = \"synthetic\"\ntrain = \"{}\"\nsynthetic_n = 16\nsynthetic_size = 32\n\
             image_size = 32\nloader_threads = 1\n[model]\nbackbone = \"tiny\"\nnorm = \"batch\"\n\
             [train]\nsteps = 3\nlr = 0.01\nclip_grad_norm = 1.0\n{extra}",
            dir.display()
        ))
        .unwrap()
    }

    #[test]
    #[ignore = "run in a process of its own by channels_last_matches_nchw"]
    fn training_steps_channels_last_track_nchw_steps() {
        let dir = tempfile::tempdir().unwrap();
        let train = |extra: &str| {
            let cfg = job(dir.path(), extra);
            let split = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, 0).unwrap().unwrap());
            let model = crate::model::with_seed(0, || {
                MultiTaskModel::new(&cfg.model, &cfg.tasks, &split.dataset.info, Device::Cpu)
            })
            .unwrap();
            let mut trainer = Trainer::new(&cfg, model, Box::new(LocalCollective)).unwrap();
            let lc = LoaderConfig::from_section(&cfg.data, 4, false, 0, 0);
            let mut losses = Vec::new();
            for batch in Loader::new(split.dataset.clone(), &split.ids[..12], lc).unwrap() {
                losses.push(trainer.step(&batch.unwrap()).unwrap().read().unwrap().losses);
            }
            let params: Vec<(String, Tensor)> = trainer.model.parameters();
            (losses, params)
        };
        let (losses_a, params_a) = train("");
        let (losses_b, params_b) = train("channels_last = true");
        assert_eq!(losses_a.len(), 3);
        for (a, b) in losses_a.iter().zip(&losses_b) {
            for (task, x) in a.iter() {
                let (x, y) = (*x, b.value(task).unwrap());
                assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-3), "{}: {x} vs {y}", task.name());
            }
        }
        for ((name, a), (_, b)) in params_a.iter().zip(&params_b) {
            assert_close(a, b, name);
            if a.dim() == 4 {
                assert!(is_channels_last(b), "{name}: the layout is kept through optimizer steps");
            }
        }
    }
}
