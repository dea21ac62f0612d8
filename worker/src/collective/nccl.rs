//! The NCCL backend for CUDA tensors. NCCL is loaded at run time (see [`ffi`] for where it is
//! looked for), so a CPU-only build and machine never need it. Nothing blocks without a bound:
//! the communicator is created non-blocking, and every call is followed by polling
//! `ncclCommGetAsyncError` and `cuStreamQuery` on the legacy default stream (the one tch's
//! kernels and these collectives share) against the set-up or step timeout; on timeout or error
//! the communicator is aborted and every later call fails. Polling the default stream also
//! waits for kernels queued before the collective, which the step timeout then covers too.
mod ffi;

use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use self::ffi::{Comm, Config, CudaDriver, Status, UniqueId};
pub(crate) use self::ffi::{NcclLibrary, UNIQUE_ID_BYTES};
use super::bucket::{buckets, scatter_back};
use super::{Collective, CollectiveError, ReduceOp, Timeouts};

/// Pause between two polls of a pending NCCL call.
const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// A new NCCL unique id (128 bytes) for rank 0 to hand to every rank.
pub(crate) fn unique_id() -> Result<Vec<u8>, CollectiveError> {
    let lib = NcclLibrary::shared()?;
    let mut id = UniqueId { internal: [0; UNIQUE_ID_BYTES] };
    // SAFETY: writes one ncclUniqueId.
    match unsafe { (lib.get_unique_id)(&mut id) } {
        ffi::NCCL_SUCCESS => Ok(id.internal.to_vec()),
        status => Err(CollectiveError::Nccl {
            op: "get_unique_id",
            message: lib.describe(status, std::ptr::null_mut()),
        }),
    }
}

/// NCCL's `ncclDataType_t` for the floating-point kinds the backend reduces.
pub(crate) fn nccl_dtype(kind: Kind) -> Option<i32> {
    match kind {
        Kind::Half => Some(6),
        Kind::Float => Some(7),
        Kind::Double => Some(8),
        Kind::BFloat16 => Some(9),
        _ => None,
    }
}

/// Refuses tensors that are not on `cuda:<device_index>` or not f16/bf16/f32/f64.
pub(crate) fn check_tensors(
    tensors: &[Tensor],
    device_index: usize,
    op: &'static str,
) -> Result<(), CollectiveError> {
    for t in tensors {
        if t.device() != Device::Cuda(device_index) || nccl_dtype(t.kind()).is_none() {
            return Err(CollectiveError::Unsupported {
                op,
                message: format!(
                    "the NCCL backend takes f16/bf16/f32/f64 tensors on cuda:{device_index}, got {:?} {:?}",
                    t.device(),
                    t.kind()
                ),
            });
        }
    }
    Ok(())
}

/// One rank of an NCCL communicator on one CUDA device.
pub(crate) struct NcclCollective {
    lib: &'static NcclLibrary,
    cuda: &'static CudaDriver,
    /// Null once aborted.
    comm: Comm,
    /// The device's retained primary context (shared with LibTorch), null if not retained.
    ctx: *mut c_void,
    cu_device: c_int,
    rank: usize,
    world_size: usize,
    device_index: usize,
    timeouts: Timeouts,
    bucket_bytes: usize,
}

// SAFETY: the communicator and context handles are used from one thread at a time (the
// `Collective` contract); NCCL and the CUDA driver allow that thread to change.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator `unique_id` names as `rank` of `world_size` on `cuda:<device_index>`.
    /// Fails (after aborting) if not every rank joins within `timeouts.setup`.
    pub(crate) fn new(
        rank: usize,
        world_size: usize,
        unique_id: &[u8],
        device_index: usize,
        timeouts: Timeouts,
        bucket_bytes: usize,
    ) -> Result<Self, CollectiveError> {
        let init_error = |message: String| CollectiveError::Nccl { op: "init", message };
        let id = UniqueId {
            internal: unique_id.try_into().map_err(|_| {
                init_error(format!("the unique id has {} bytes, expected {UNIQUE_ID_BYTES}", unique_id.len()))
            })?,
        };
        if rank >= world_size {
            return Err(init_error(format!("rank {rank} is not below the world size {world_size}")));
        }
        let lib = NcclLibrary::shared()?;
        let cuda = CudaDriver::shared()?;
        let cu_device = cuda.device(device_index)?;
        let mut this = Self {
            lib,
            cuda,
            comm: std::ptr::null_mut(),
            ctx: std::ptr::null_mut(),
            cu_device,
            rank,
            world_size,
            device_index,
            timeouts,
            bucket_bytes: bucket_bytes.max(1),
        };
        let mut ctx = std::ptr::null_mut();
        // SAFETY: writes one context handle; released in Drop.
        match unsafe { cuda.primary_ctx_retain(&mut ctx, cu_device) } {
            ffi::CUDA_SUCCESS => this.ctx = ctx,
            status => {
                return Err(init_error(format!("cuDevicePrimaryCtxRetain failed with CUresult {status}")))
            }
        }
        this.bind("init")?;
        let mut config = Config::non_blocking();
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; NCCL copies the config.
        let status = unsafe {
            (lib.comm_init_rank_config)(&mut comm, world_size as c_int, id, rank as c_int, &mut config)
        };
        this.comm = comm;
        this.check_launch("init", status)?;
        this.wait("init", timeouts.setup, |_| Ok(true))?;
        tracing::info!(rank, world_size, device_index, nccl = %lib.path().display(), version = lib.version(), "NCCL communicator ready");
        Ok(this)
    }

    /// Makes this device's primary context current, as LibTorch may have switched devices.
    fn bind(&self, op: &'static str) -> Result<(), CollectiveError> {
        // SAFETY: `ctx` is a retained primary context.
        match unsafe { self.cuda.ctx_set_current(self.ctx) } {
            ffi::CUDA_SUCCESS => Ok(()),
            status => Err(CollectiveError::Nccl {
                op,
                message: format!("cuCtxSetCurrent failed with CUresult {status}"),
            }),
        }
    }

    /// Aborts the communicator (without waiting for peers); later calls fail.
    fn abort(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: `comm` is live and not used after this.
            let status = unsafe { (self.lib.comm_abort)(self.comm) };
            tracing::warn!(rank = self.rank, status, "NCCL communicator aborted");
            self.comm = std::ptr::null_mut();
        }
    }

    /// Turns a launch status into an error (aborting) unless it succeeded or is in progress.
    fn check_launch(&mut self, op: &'static str, status: Status) -> Result<(), CollectiveError> {
        if status == ffi::NCCL_SUCCESS || status == ffi::NCCL_IN_PROGRESS {
            return Ok(());
        }
        let message = self.lib.describe(status, self.comm);
        self.abort();
        Err(CollectiveError::Nccl { op, message })
    }

    /// Polls until the communicator has no pending operation and `done` says so, an error
    /// shows up, or `timeout` passes; aborts on the latter two.
    fn wait(
        &mut self,
        op: &'static str,
        timeout: Duration,
        mut done: impl FnMut(&Self) -> Result<bool, String>,
    ) -> Result<(), CollectiveError> {
        let start = Instant::now();
        loop {
            let mut state = ffi::NCCL_SUCCESS;
            // SAFETY: `comm` is live (callers check) and `state` is one int.
            let status = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut state) };
            let state = if status == ffi::NCCL_SUCCESS { state } else { status };
            let finished = match state {
                ffi::NCCL_SUCCESS => done(self),
                ffi::NCCL_IN_PROGRESS => Ok(false),
                failed => Err(self.lib.describe(failed, self.comm)),
            };
            match finished {
                Ok(true) => return Ok(()),
                Ok(false) if start.elapsed() < timeout => std::thread::sleep(POLL_INTERVAL),
                Ok(false) => {
                    self.abort();
                    let message = format!("timed out after {} ms; communicator aborted", timeout.as_millis());
                    return Err(CollectiveError::Nccl { op, message });
                }
                Err(message) => {
                    self.abort();
                    return Err(CollectiveError::Nccl { op, message });
                }
            }
        }
    }

    /// Whether the default stream has run everything queued on it.
    fn stream_idle(&self) -> Result<bool, String> {
        // SAFETY: queries the current context's legacy default stream.
        match unsafe { self.cuda.stream_query_default() } {
            ffi::CUDA_SUCCESS => Ok(true),
            ffi::CUDA_ERROR_NOT_READY => Ok(false),
            status => Err(format!("cuStreamQuery failed with CUresult {status}")),
        }
    }

    /// Runs `launch(buffer, count, dtype)` on each bucket's flat buffer, in place, then waits.
    fn each_bucket(
        &mut self,
        tensors: &mut [Tensor],
        op: &'static str,
        launch: impl Fn(&NcclLibrary, *mut c_void, usize, c_int, Comm) -> Status,
    ) -> Result<(), CollectiveError> {
        check_tensors(tensors, self.device_index, op)?;
        if self.comm.is_null() {
            let message = "the communicator was aborted after an earlier error".to_string();
            return Err(CollectiveError::Nccl { op, message });
        }
        let _guard = tch::no_grad_guard();
        for range in buckets(tensors, self.bucket_bytes) {
            let group = &mut tensors[range];
            let dtype = nccl_dtype(group[0].kind()).expect("checked above");
            let in_place = group.len() == 1 && group[0].is_contiguous();
            let flat = if in_place {
                group[0].shallow_clone()
            } else {
                Tensor::f_cat(&group.iter().map(|t| t.f_reshape([-1])).collect::<Result<Vec<_>, _>>()?, 0)?
            };
            if flat.numel() == 0 {
                continue;
            }
            self.bind(op)?;
            let status = launch(self.lib, flat.data_ptr(), flat.numel(), dtype, self.comm);
            self.check_launch(op, status)?;
            self.wait(op, self.timeouts.step, Self::stream_idle)?;
            if !in_place {
                scatter_back(group, &flat)?;
            }
        }
        Ok(())
    }
}

impl Collective for NcclCollective {
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), CollectiveError> {
        let red_op = match op {
            ReduceOp::Sum => ffi::NCCL_SUM,
            ReduceOp::Mean => ffi::NCCL_AVG,
        };
        self.each_bucket(tensors, "all_reduce", |lib, buf, count, dtype, comm| {
            // SAFETY: `buf` holds `count` elements of `dtype` on this communicator's device.
            unsafe { (lib.all_reduce)(buf, buf, count, dtype, red_op, comm, std::ptr::null_mut()) }
        })
    }

    fn broadcast(&mut self, tensors: &mut [Tensor], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            let message = format!("root {root} is not below the world size {}", self.world_size);
            return Err(CollectiveError::Nccl { op: "broadcast", message });
        }
        self.each_bucket(tensors, "broadcast", |lib, buf, count, dtype, comm| {
            // SAFETY: as for all_reduce.
            unsafe { (lib.broadcast)(buf, buf, count, dtype, root as c_int, comm, std::ptr::null_mut()) }
        })
    }

    #[cfg(test)]
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut one = [Tensor::f_zeros([1], (Kind::Float, Device::Cuda(self.device_index)))?];
        self.all_reduce(&mut one, ReduceOp::Sum)
    }
}

impl Drop for NcclCollective {
    /// Finalizes (flushing pending work, bounded by the step timeout) and destroys the
    /// communicator, or aborts it if that fails or it is already broken.
    fn drop(&mut self) {
        if !self.comm.is_null() && self.bind("destroy").is_ok() {
            // SAFETY: `comm` is live; after finalize completes it is destroyed exactly once.
            let status = unsafe { (self.lib.comm_finalize)(self.comm) };
            if self.check_launch("finalize", status).is_ok()
                && self.wait("finalize", self.timeouts.step, |_| Ok(true)).is_ok()
            {
                let status = unsafe { (self.lib.comm_destroy)(self.comm) };
                if status != ffi::NCCL_SUCCESS {
                    tracing::warn!(rank = self.rank, status, "ncclCommDestroy failed");
                }
                self.comm = std::ptr::null_mut();
            }
        }
        self.abort();
        if !self.ctx.is_null() {
            // SAFETY: releases the retain done in `new`.
            unsafe { self.cuda.primary_ctx_release(self.cu_device) };
        }
    }
}

#[cfg(test)]
mod tests;
