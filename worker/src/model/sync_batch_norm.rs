//! SyncBatchNorm (`model.norm = "sync_batch"`): BatchNorm whose training statistics are those of
//! the batches of all data-parallel ranks together, as `torch.nn.SyncBatchNorm` computes them, so
//! N ranks with batch b train exactly as one process with batch N·b.
//!
//! The forward/backward pair is a LibTorch autograd function in the C++ shim
//! (`worker/shim/sync_batch_norm.cpp`). Forward and backward each sum a small per-channel vector
//! across ranks by calling back into [`SyncContext`], which every layer of a model shares and to
//! which the Trainer attaches the job's collective ([`share_collective`]); until then the layers
//! see a world of one and compute exactly BatchNorm. Every rank therefore makes two collective
//! calls per layer and step (one in forward, one in backward) in the same order, also a rank
//! whose batch is empty. In evaluation the layer is BatchNorm with its running statistics and
//! makes no collective call.
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

use super::norm::{BatchNormVars, EPS, MOMENTUM};
use super::MultiTaskModel;
use crate::collective::{Collective, CollectiveError, ReduceOp, SharedCollective};
use crate::WorkerError;

type SumFn = unsafe extern "C" fn(*const c_void, *mut C_tensor, *mut c_char, usize) -> c_int;
type ReleaseFn = unsafe extern "C" fn(*const c_void);

extern "C" {
    fn mtl_sync_batch_norm(
        x: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        running_mean: *const C_tensor,
        running_var: *const C_tensor,
        momentum: f64,
        eps: f64,
        ctx: *const c_void,
        sum: SumFn,
        release: ReleaseFn,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// What the SyncBatchNorm layers of one model reduce their statistics through: nothing (a world
/// of one) until [`SyncContext::attach`].
#[derive(Debug, Default)]
pub(crate) struct SyncContext {
    collective: Mutex<Option<SharedCollective>>,
}

impl SyncContext {
    /// Makes every layer sharing this context reduce through `collective` from now on.
    pub(crate) fn attach(&self, collective: SharedCollective) {
        *self.collective.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(collective);
    }

    /// Sums `t` in place across ranks.
    fn sum_across_ranks(&self, t: Tensor) -> Result<(), CollectiveError> {
        // Cloned out so the context's lock is not held during the collective.
        let collective = self.collective.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match collective {
            Some(mut c) => c.all_reduce(&mut [t], ReduceOp::Sum),
            None => Ok(()),
        }
    }
}

/// Gives `model`'s SyncBatchNorm layers (if it has any) the job's collective and returns the
/// handle the trainer keeps using; without such layers `collective` comes back unchanged.
pub(crate) fn share_collective(
    model: &MultiTaskModel,
    collective: Box<dyn Collective>,
) -> Box<dyn Collective> {
    match model.sync_context() {
        Some(sync) => {
            let shared = SharedCollective::new(collective);
            sync.attach(shared.clone());
            Box::new(shared)
        }
        None => collective,
    }
}

/// For a rank whose batch has no images: runs the backbone (the only part with SyncBatchNorm
/// layers) in training mode on `images` (`[0,3,H,W]`), so that its layers make their forward
/// collective calls as every other rank's do, and returns a zero connected to all of them; added
/// to every task's loss, it makes each backward pass make the backward calls too, in the same
/// order (autograd orders the layers' backward by the backbone's structure alone). `None` when
/// the model has no SyncBatchNorm layers.
pub(crate) fn empty_batch_pass(
    model: &MultiTaskModel,
    images: &Tensor,
) -> Result<Option<Tensor>, WorkerError> {
    if model.sync_context().is_none() {
        return Ok(None);
    }
    let mut zero = Tensor::f_zeros([], (Kind::Float, images.device()))?;
    for tap in model.backbone.forward(images, true)? {
        zero = zero.f_add(&tap.f_sum(Kind::Float)?.f_mul_scalar(0.0)?)?;
    }
    Ok(Some(zero))
}

/// One SyncBatchNorm layer: BatchNorm's variables and the model's shared context.
#[derive(Debug)]
pub(crate) struct SyncBatchNorm {
    vars: BatchNormVars,
    sync: Arc<SyncContext>,
}

impl SyncBatchNorm {
    pub(crate) fn new(vars: BatchNormVars, sync: Arc<SyncContext>) -> Self {
        Self { vars, sync }
    }

    /// In training, normalises `x` with the statistics of all ranks' batches (updating the
    /// running statistics with them); in evaluation, BatchNorm with the running statistics.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, WorkerError> {
        if !train {
            return self.vars.forward(x, false);
        }
        let v = &self.vars;
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // The shim holds this reference for as long as its graph node lives and gives it back
        // through `release` (also when the call fails).
        let ctx = Arc::into_raw(Arc::clone(&self.sync)).cast::<c_void>();
        // SAFETY: the tensor pointers are live for the call; `ctx` is an `Arc<SyncContext>`
        // reference that `sum_callback` borrows and `release_callback` drops exactly once; the
        // shim catches every C++ exception and writes at most `len` bytes to `err`.
        crate::shim::call(|err, len| unsafe {
            mtl_sync_batch_norm(
                x.as_ptr(),
                v.weight.as_ptr(),
                v.bias.as_ptr(),
                v.running_mean.as_ptr(),
                v.running_var.as_ptr(),
                MOMENTUM,
                EPS,
                ctx,
                sum_callback,
                release_callback,
                &mut out,
                err,
                len,
            )
        })?;
        if out.is_null() {
            return Err(WorkerError::Torch(tch::TchError::Torch(
                "sync_batch_norm returned no tensor".into(),
            )));
        }
        // SAFETY: on success `out` is a new tensor handle whose ownership passes to us.
        Ok(unsafe { Tensor::from_ptr(out) })
    }
}

/// Sums the tensor `t` (a new handle we own) across the ranks of the context `ctx`. Called by
/// the shim from forward and from autograd's backward, possibly on another thread; a failure
/// or a panic becomes a message and a non-zero status, never an unwind into C++.
extern "C" fn sum_callback(ctx: *const c_void, t: *mut C_tensor, err: *mut c_char, err_len: usize) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `t` is a heap-allocated tensor handle the shim gives up; `ctx` is an
        // `Arc<SyncContext>` the shim keeps alive during the call.
        let (tensor, sync) = unsafe { (Tensor::from_ptr(t), &*ctx.cast::<SyncContext>()) };
        sync.sum_across_ranks(tensor)
    }));
    let message = match result {
        Ok(Ok(())) => return 0,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the all-reduce panicked".to_string(),
    };
    if !err.is_null() && err_len > 0 {
        let n = message.len().min(err_len - 1);
        // SAFETY: the shim's buffer holds `err_len` bytes; we write `n + 1 <= err_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(message.as_ptr().cast::<c_char>(), err, n);
            *err.add(n) = 0;
        }
    }
    1
}

/// Drops the shim's reference to a context.
extern "C" fn release_callback(ctx: *const c_void) {
    // Dropping the last reference may drop a collective (closing sockets); never unwind into C++.
    let _ = catch_unwind(|| {
        // SAFETY: `ctx` came from `Arc::into_raw` in `SyncBatchNorm::forward`; the shim releases
        // it exactly once.
        drop(unsafe { Arc::from_raw(ctx.cast::<SyncContext>()) });
    });
}

#[cfg(test)]
mod tests;
