//! `train.cuda_graphs`: the training step captured once in a CUDA graph and replayed for every
//! full batch, so that a step costs one graph launch instead of thousands of kernel launches
//! (the tiny and ResNet-18-width models are launch-bound on an H100).
//!
//! How: the first [`WARMUP_STEPS`] full batches train eagerly (cuDNN's autotuning, the autograd
//! engine's threads and the optimizer's state all settle there), every step on one of
//! LibTorch's pool streams (a graph cannot be captured on the default stream). The next full
//! batch is copied into static input tensors and [`Trainer::device_step`] runs once under
//! capture (`worker/shim/cuda_graph.cpp`): nothing executes then; the graph is replayed at once
//! for that batch. From then on a full batch is copied into the same static tensors, the
//! learning rate is written into a device scalar the fused optimizer reads, and the graph is
//! replayed; its outputs (the step's losses, weights, counts, gradient norm) are copied into
//! the step's report. The step is capturable because nothing in it reads the device
//! ([`super::StepReport::read`]) and every host value it needs (the counts the host knows, the
//! learning rate) comes in as a device tensor.
//!
//! Batches of another size (an epoch's tail, a batch with unreadable images) train eagerly on
//! the same stream. Only a trainer that stays a world of one takes a graph
//! ([`Trainer::with_cuda_graphs`]: `worker train --standalone` and `worker bench-step`): a
//! distributed trainer may be handed an NCCL collective at any generation, and NCCL orders
//! itself after the default stream (`collective/nccl.rs`), which a pool stream does not wait
//! for. A capture that fails stops training with an error that says to switch graphs off: after
//! a failed capture LibTorch's allocators may still count a capture under way.
//!
//! Not verified on a GPU yet (none was available while this was written). The CPU tests cover
//! what runs without one: a step on the static inputs after another batch and rate were loaded
//! into them trains as a step on that batch (what a replay computes), the tensor learning rate,
//! and the refusal on a CPU trainer. `bench/gpu_check.sh` runs
//! `a_captured_step_trains_as_eager_steps_do_on_cuda`, and `bench/gpu_compare.sh` times it.
use std::ffi::{c_char, c_int, c_void};

use tch::{Device, Kind, Tensor};

use super::losses::Targets;
use super::{StepInputs, StepReport, Trainer};
use crate::data::batch::ClassTarget;
use crate::data::Batch;
use crate::optim::Lr;
use crate::tasks::fcos_targets::FcosTargets;
use crate::{shim, WorkerError};

/// Full batches trained eagerly before the capture (PyTorch's whole-network capture example
/// warms up for 3 iterations on the side stream).
pub(crate) const WARMUP_STEPS: u32 = 3;

extern "C" {
    fn mtl_cuda_graphs_built() -> c_int;
    fn mtl_cuda_side_stream(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn mtl_cuda_graph_new(out: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn mtl_cuda_graph_capture_begin(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn mtl_cuda_graph_capture_end(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn mtl_cuda_graph_replay(g: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn mtl_cuda_graph_free(g: *mut c_void);
}

/// Whether this worker's shim was built with CUDA graphs (LibTorch's CUDA library and the CUDA
/// runtime headers were there at build time).
pub(crate) fn built_with_cuda_graphs() -> bool {
    // SAFETY: no arguments; the shim only returns a constant.
    unsafe { mtl_cuda_graphs_built() != 0 }
}

/// The trainer's CUDA graph of its step: warming up, then captured.
#[derive(Debug)]
pub(crate) struct StepGraph {
    device: i32,
    /// Full batches still to train eagerly before the capture.
    warmup_left: u32,
    captured: Option<Captured>,
}

impl StepGraph {
    /// The graph of a trainer on `device`, which must be a CUDA device, with the shim built for
    /// it. Errors name `train.cuda_graphs`.
    pub(crate) fn new(device: Device) -> Result<Self, WorkerError> {
        let Device::Cuda(index) = device else {
            let on = format!("{device:?}").to_lowercase();
            return Err(refuse(format!("needs a CUDA device, and this worker trains on {on}")));
        };
        if !built_with_cuda_graphs() {
            return Err(refuse(
                "this worker was built without the CUDA runtime headers (see worker/build.rs)".into(),
            ));
        }
        Ok(Self { device: index as i32, warmup_left: WARMUP_STEPS, captured: None })
    }

    /// One training step of `trainer` (a world of one) on `inputs`: a replay of the captured
    /// graph when the batch fits it, else an eager step (a warm-up, or a batch the graph cannot
    /// take), capturing the graph once the warm-up is over. A capture that fails is an error
    /// that says how to train without graphs.
    pub(crate) fn step(
        &mut self,
        trainer: &mut Trainer,
        inputs: &StepInputs<'_>,
    ) -> Result<StepReport, WorkerError> {
        // Every step on the same pool stream, eager or not: the graph's memory and the eager
        // steps' then never race on a stream boundary.
        shim::call(|err, len| {
            // SAFETY: the shim writes at most `len` bytes of message into `err`.
            unsafe { mtl_cuda_side_stream(self.device, err, len) }
        })?;
        if inputs.batch.ids.len() != trainer.batch_size {
            return trainer.device_step(inputs, Lr::Value(inputs.lr));
        }
        if let Some(captured) = &self.captured {
            if !captured.inputs.load(inputs)? {
                return trainer.device_step(inputs, Lr::Value(inputs.lr));
            }
            captured.graph.replay()?;
            trainer.count_replayed_step();
            return captured.report.copied(trainer.steps_done(), inputs.lr);
        }
        if self.warmup_left > 0 {
            self.warmup_left -= 1;
            return trainer.device_step(inputs, Lr::Value(inputs.lr));
        }
        let captured = Captured::capture(trainer, inputs).map_err(|e| {
            refuse(format!("could not capture the training step ({e}); train with train.cuda_graphs = false"))
        })?;
        captured.graph.replay()?;
        let report = captured.report.copied(trainer.steps_done(), inputs.lr)?;
        tracing::info!(step = trainer.steps_done(), "train.cuda_graphs: training step captured");
        self.captured = Some(captured);
        Ok(report)
    }
}

/// An error about `train.cuda_graphs`.
pub(super) fn refuse(message: String) -> WorkerError {
    WorkerError::Config(mtl_job::JobConfigError::Invalid { key: "train.cuda_graphs".into(), message })
}

/// A captured step: the graph, its static inputs, and the captured step's report (tensors
/// every replay overwrites).
#[derive(Debug)]
struct Captured {
    graph: CudaGraph,
    inputs: StaticInputs,
    report: StepReport,
}

impl Captured {
    /// Captures one step of `trainer` on copies of `inputs` (the capture runs nothing; the
    /// caller replays it for this batch).
    fn capture(trainer: &mut Trainer, inputs: &StepInputs<'_>) -> Result<Self, WorkerError> {
        let statics = StaticInputs::copy_of(inputs)?;
        let graph = CudaGraph::new()?;
        graph.capture_begin()?;
        let captured = {
            // A panic inside the step still ends the capture (a stream left capturing fails
            // every later call on it).
            let _end_on_panic = EndCaptureOnPanic(&graph);
            trainer.device_step(&statics.inputs(), Lr::Tensor(&statics.lr))
        };
        let ended = graph.capture_end();
        let report = captured?;
        ended?;
        Ok(Self { graph, inputs: statics, report })
    }
}

/// Ends a capture when dropped during a panic.
struct EndCaptureOnPanic<'a>(&'a CudaGraph);

impl Drop for EndCaptureOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.capture_end();
        }
    }
}

/// The inputs a captured step reads: tensors of their own, which every replay's inputs are
/// copied into, and the learning rate as an f32 scalar on the device.
#[derive(Debug)]
struct StaticInputs {
    batch: Batch,
    targets: Targets,
    host_known: Tensor,
    lr: Tensor,
    /// The rate when copied: what the captured step's own report says (replays report theirs).
    lr_value: f64,
}

impl StaticInputs {
    /// Copies of `inputs`, in new memory on the batch's device (targets built on the host for
    /// a hand-made batch included: the captured step must read nothing from the host).
    fn copy_of(inputs: &StepInputs<'_>) -> Result<Self, WorkerError> {
        let device = inputs.batch.images.device();
        Ok(Self {
            batch: copy_batch(inputs.batch, device)?,
            targets: Targets {
                det: inputs.targets.det.as_ref().map(|t| copy_targets(t, device)).transpose()?,
            },
            host_known: copy_to(inputs.host_known, device)?,
            lr: Tensor::f_full([], inputs.lr, (Kind::Float, device))?,
            lr_value: inputs.lr,
        })
    }

    /// The step inputs these tensors are.
    fn inputs(&self) -> StepInputs<'_> {
        StepInputs {
            batch: &self.batch,
            targets: &self.targets,
            host_known: &self.host_known,
            lr: self.lr_value,
        }
    }

    /// Copies `inputs` into these tensors; `false` (nothing copied) when a tensor's shape or
    /// dtype differs, one is not on the device, or only one side has detection targets.
    fn load(&self, inputs: &StepInputs<'_>) -> Result<bool, WorkerError> {
        let Some(pairs) = self.pairs(inputs) else { return Ok(false) };
        for (dst, src) in pairs {
            dst.shallow_clone().f_copy_(src)?;
        }
        let _ = self.lr.shallow_clone().f_fill_(inputs.lr)?;
        Ok(true)
    }

    /// The static tensors and the tensors of `inputs` to copy into them, in the same order;
    /// `None` when they do not fit (see [`Self::load`]).
    fn pairs<'a>(&'a self, inputs: &StepInputs<'a>) -> Option<Vec<(&'a Tensor, &'a Tensor)>> {
        let (mut dst, mut src) = (batch_tensors(&self.batch), batch_tensors(inputs.batch));
        match (&self.targets.det, &inputs.targets.det) {
            (Some(d), Some(s)) => {
                dst.extend(target_tensors(d));
                src.extend(target_tensors(s));
            }
            (None, None) => {}
            _ => return None,
        }
        dst.push(&self.host_known);
        src.push(inputs.host_known);
        let fits = dst.len() == src.len()
            && dst.iter().zip(&src).all(|(d, s)| d.size() == s.size() && d.kind() == s.kind())
            && src.iter().all(|s| s.device() == self.lr.device());
        fits.then(|| dst.into_iter().zip(src).collect())
    }
}

/// The device tensors of a batch, in a fixed order.
fn batch_tensors(b: &Batch) -> Vec<&Tensor> {
    let (ClassTarget::Single(class) | ClassTarget::Multi(class)) = &b.class_target;
    vec![&b.images, class, &b.class_labelled, &b.mask_target, &b.mask_labelled]
}

fn target_tensors(t: &FcosTargets) -> [&Tensor; 3] {
    [&t.labels, &t.ltrb, &t.labelled]
}

/// A batch whose tensors are copies of `b`'s on `device` (memory the graph owns for its
/// replays). Its detection targets are left out: the step takes them from its inputs.
fn copy_batch(b: &Batch, device: Device) -> Result<Batch, WorkerError> {
    let copy = |t: &Tensor| copy_to(t, device);
    Ok(Batch {
        ids: b.ids.clone(),
        images: copy(&b.images)?,
        class_target: match &b.class_target {
            ClassTarget::Single(t) => ClassTarget::Single(copy(t)?),
            ClassTarget::Multi(t) => ClassTarget::Multi(copy(t)?),
        },
        class_labelled: copy(&b.class_labelled)?,
        boxes: b.boxes.clone(),
        boxes_labelled: b.boxes_labelled.clone(),
        mask_target: copy(&b.mask_target)?,
        mask_labelled: copy(&b.mask_labelled)?,
        originals: b.originals.clone(),
        det_targets: None,
        colour_jitter: None,
    })
}

/// A copy of `t` in new memory.
pub(super) fn copy_of(t: &Tensor) -> Result<Tensor, tch::TchError> {
    copy_to(t, t.device())
}

/// A copy of `t` in new memory on `device`.
fn copy_to(t: &Tensor, device: Device) -> Result<Tensor, tch::TchError> {
    let mut out = Tensor::f_empty(t.size(), (t.kind(), device))?;
    out.f_copy_(t)?;
    Ok(out)
}

fn copy_targets(t: &FcosTargets, device: Device) -> Result<FcosTargets, WorkerError> {
    Ok(t.map_tensors(|x| copy_to(x, device))?)
}

/// An `at::cuda::CUDAGraph`, freed on drop.
#[derive(Debug)]
struct CudaGraph(*mut c_void);

// SAFETY: the graph is only used from the thread that owns the trainer; moving it between
// threads (with the trainer) is what LibTorch's own Python binding allows.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    fn new() -> Result<Self, WorkerError> {
        let mut g = std::ptr::null_mut();
        // SAFETY: the shim writes one pointer into `g` on success.
        shim::call(|err, len| unsafe { mtl_cuda_graph_new(&mut g, err, len) })?;
        Ok(Self(g))
    }

    fn capture_begin(&self) -> Result<(), WorkerError> {
        // SAFETY: `self.0` is a live graph from `mtl_cuda_graph_new`.
        Ok(shim::call(|err, len| unsafe { mtl_cuda_graph_capture_begin(self.0, err, len) })?)
    }

    fn capture_end(&self) -> Result<(), WorkerError> {
        // SAFETY: as in `capture_begin`.
        Ok(shim::call(|err, len| unsafe { mtl_cuda_graph_capture_end(self.0, err, len) })?)
    }

    fn replay(&self) -> Result<(), WorkerError> {
        // SAFETY: as in `capture_begin`.
        Ok(shim::call(|err, len| unsafe { mtl_cuda_graph_replay(self.0, err, len) })?)
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from `mtl_cuda_graph_new` and is freed once.
        unsafe { mtl_cuda_graph_free(self.0) }
    }
}

#[cfg(test)]
mod tests;
