//! LibTorch's fused optimiser kernels (`_fused_sgd_`, `_fused_adamw_`) and the foreach ops
//! (`_foreach_norm`, `_foreach_mul_`, `_foreach_add_`, `_foreach_zero_`) over tensor lists,
//! through the C++ shim (`worker/shim/foreach.cpp`): tch 0.24 exposes none of them. One call
//! covers a whole parameter group, so a step costs a handful of calls instead of several per
//! parameter. Lists are slices of `Tensor` or `&Tensor`; on CUDA, all of one call's tensors
//! should share a device and dtype (the multi-tensor kernels; mixed lists, and every list on the
//! CPU, take LibTorch's loop over the tensors, still one call from here). An empty list is no
//! call (the foreach ops reject them). The learning rate is an `f64`, or a 0-dim device tensor
//! ([`Lr`]) that a captured CUDA graph replays with each step's value.
use std::borrow::Borrow;
use std::ffi::{c_char, c_int};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::{shim, WorkerError};

type List = *const *const C_tensor;

extern "C" {
    fn mtl_fused_sgd_(
        params: List,
        grads: List,
        momentum_buffers: List,
        n: usize,
        n_buffers: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        lr_tensor: *const C_tensor,
        nesterov: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mtl_fused_adamw_(
        params: List,
        grads: List,
        exp_avgs: List,
        exp_avg_sqs: List,
        state_steps: List,
        n: usize,
        lr: f64,
        lr_tensor: *const C_tensor,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mtl_foreach_norm(
        tensors: List,
        n: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mtl_foreach_mul_tensor_(
        tensors: List,
        n: usize,
        scalar: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mtl_foreach_add_scalar_(
        tensors: List,
        n: usize,
        scalar: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mtl_foreach_zero_(tensors: List, n: usize, err: *mut c_char, err_len: usize) -> c_int;
    fn mtl_set_grad(param: *const C_tensor, grad: *const C_tensor, err: *mut c_char, err_len: usize)
        -> c_int;
}

/// A learning rate: a value, or a 0-dim f32 tensor on the parameters' device that the kernel
/// reads there (what a CUDA graph of the step replays with each step's value).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lr<'a> {
    Value(f64),
    Tensor(&'a Tensor),
}

impl From<f64> for Lr<'_> {
    fn from(lr: f64) -> Self {
        Lr::Value(lr)
    }
}

impl Lr<'_> {
    /// The value, and the tensor pointer the shim takes (null for a value).
    fn parts(self) -> (f64, *const C_tensor) {
        match self {
            Lr::Value(lr) => (lr, std::ptr::null()),
            Lr::Tensor(t) => (0.0, t.as_ptr()),
        }
    }
}

/// Hyper-parameters of one fused SGD call (dampening 0, as everywhere in `optim`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdHyper<'a> {
    pub lr: Lr<'a>,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

/// Hyper-parameters of one fused AdamW call (amsgrad off).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWHyper<'a> {
    pub lr: Lr<'a>,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

/// `torch.optim.SGD(fused=True)`'s update: `params[i]` from `grads[i]`, with `buffers[i]` as
/// momentum buffer (`buffers` empty when `momentum` is 0, else one per parameter). A zero
/// buffer reproduces PyTorch's first step exactly. Gradients are left unchanged.
pub(crate) fn sgd_<P, G, B>(
    params: &[P],
    grads: &[G],
    buffers: &[B],
    h: SgdHyper<'_>,
) -> Result<(), WorkerError>
where
    P: Borrow<Tensor>,
    G: Borrow<Tensor>,
    B: Borrow<Tensor>,
{
    let n = params.len();
    check_len("_fused_sgd_", "gradients", grads.len(), n)?;
    check_len("_fused_sgd_", "momentum buffers", buffers.len(), if h.momentum != 0.0 { n } else { 0 })?;
    if n == 0 {
        return Ok(());
    }
    let (p, g, b) = (ptrs(params), ptrs(grads), ptrs(buffers));
    let (lr, lr_tensor) = h.lr.parts();
    shim::call(|err, len| {
        // SAFETY: the lists hold `n` (`b.len()`) live tensor pointers for the duration of the call.
        unsafe {
            mtl_fused_sgd_(
                p.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                n,
                b.len(),
                h.weight_decay,
                h.momentum,
                lr,
                lr_tensor,
                c_int::from(h.nesterov),
                err,
                len,
            )
        }
    })
    .map_err(WorkerError::from)
}

/// `torch.optim.AdamW(fused=True)`'s update of `params` from `grads`, with the moments
/// `exp_avgs`, `exp_avg_sqs` and per-parameter step numbers `steps` (f32 scalars on the
/// parameters' device, already counting this update). Gradients are left unchanged. On the
/// CPU LibTorch's kernel reads each step count with `item` (host memory, no device read, but an
/// `aten::item` call per parameter for an op counter); on CUDA the kernel reads them itself.
pub(crate) fn adamw_<P, G, M, V, S>(
    params: &[P],
    grads: &[G],
    exp_avgs: &[M],
    exp_avg_sqs: &[V],
    steps: &[S],
    h: AdamWHyper<'_>,
) -> Result<(), WorkerError>
where
    P: Borrow<Tensor>,
    G: Borrow<Tensor>,
    M: Borrow<Tensor>,
    V: Borrow<Tensor>,
    S: Borrow<Tensor>,
{
    let n = params.len();
    check_len("_fused_adamw_", "gradients", grads.len(), n)?;
    check_len("_fused_adamw_", "exp_avgs", exp_avgs.len(), n)?;
    check_len("_fused_adamw_", "exp_avg_sqs", exp_avg_sqs.len(), n)?;
    check_len("_fused_adamw_", "steps", steps.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v, s) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs), ptrs(steps));
    let [beta1, beta2] = h.betas;
    let (lr, lr_tensor) = h.lr.parts();
    shim::call(|err, len| {
        // SAFETY: each list holds `n` live tensor pointers for the duration of the call.
        unsafe {
            mtl_fused_adamw_(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                s.as_ptr(),
                n,
                lr,
                lr_tensor,
                beta1,
                beta2,
                h.weight_decay,
                h.eps,
                err,
                len,
            )
        }
    })
    .map_err(WorkerError::from)
}

/// The L2 norm of each tensor, as 0-dim tensors of its dtype on its device.
pub(crate) fn foreach_norm<T: Borrow<Tensor>>(tensors: &[T]) -> Result<Vec<Tensor>, WorkerError> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let list = ptrs(tensors);
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); list.len()];
    shim::call(|err, len| {
        // SAFETY: `list` holds live tensor pointers; `out` has room for one pointer per tensor.
        unsafe { mtl_foreach_norm(list.as_ptr(), list.len(), out.as_mut_ptr(), err, len) }
    })?;
    // SAFETY: on success each entry is a new tensor handle whose ownership passes to us.
    Ok(out.into_iter().map(|t| unsafe { Tensor::from_ptr(t) }).collect())
}

/// Multiplies every tensor in place by the 0-dim tensor `scalar` (on their device: its value
/// is never read on the host).
pub(crate) fn foreach_mul_<T: Borrow<Tensor>>(tensors: &[T], scalar: &Tensor) -> Result<(), WorkerError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let list = ptrs(tensors);
    shim::call(|err, len| {
        // SAFETY: `list` and `scalar` are live tensors for the duration of the call.
        unsafe { mtl_foreach_mul_tensor_(list.as_ptr(), list.len(), scalar.as_ptr(), err, len) }
    })
    .map_err(WorkerError::from)
}

/// Adds `scalar` to every tensor in place.
pub(crate) fn foreach_add_<T: Borrow<Tensor>>(tensors: &[T], scalar: f64) -> Result<(), WorkerError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let list = ptrs(tensors);
    shim::call(|err, len| {
        // SAFETY: `list` holds live tensor pointers for the duration of the call.
        unsafe { mtl_foreach_add_scalar_(list.as_ptr(), list.len(), scalar, err, len) }
    })
    .map_err(WorkerError::from)
}

/// Zeroes every tensor in place.
pub(crate) fn foreach_zero_<T: Borrow<Tensor>>(tensors: &[T]) -> Result<(), WorkerError> {
    if tensors.is_empty() {
        return Ok(());
    }
    let list = ptrs(tensors);
    shim::call(|err, len| {
        // SAFETY: `list` holds live tensor pointers for the duration of the call.
        unsafe { mtl_foreach_zero_(list.as_ptr(), list.len(), err, len) }
    })
    .map_err(WorkerError::from)
}

/// Makes `grad` the gradient of `param`: backward then accumulates into it in place.
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), WorkerError> {
    shim::call(|err, len| {
        // SAFETY: both pointers are live tensors for the duration of the call.
        unsafe { mtl_set_grad(param.as_ptr(), grad.as_ptr(), err, len) }
    })
    .map_err(WorkerError::from)
}

fn ptrs<T: Borrow<Tensor>>(tensors: &[T]) -> Vec<*const C_tensor> {
    tensors.iter().map(|t| t.borrow().as_ptr()).collect()
}

fn check_len(op: &str, what: &str, got: usize, want: usize) -> Result<(), WorkerError> {
    if got == want {
        return Ok(());
    }
    Err(WorkerError::Torch(tch::TchError::Torch(format!("{op}: {got} {what}, expected {want}"))))
}
