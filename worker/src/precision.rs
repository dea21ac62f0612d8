//! Mixed precision: bf16 autocast through the C++ shim in `worker/shim/autocast.cpp` (tch 0.24's
//! own autocast is fp16 on CUDA only). The forward pass and losses run under an
//! [`AutocastGuard`]; backward and the optimizer step run outside it, in fp32 master weights.
use std::ffi::c_int;

use crate::WorkerError;

extern "C" {
    fn mtl_autocast_enter_bf16(cuda: c_int, prev_enabled: *mut c_int, prev_dtype: *mut c_int) -> c_int;
    fn mtl_autocast_exit(cuda: c_int, prev_enabled: c_int, prev_dtype: c_int) -> c_int;
    #[cfg(test)]
    fn mtl_autocast_state(cuda: c_int, enabled: *mut c_int, is_bf16: *mut c_int) -> c_int;
}

/// bf16 autocast on one device type for this thread, until dropped (then the previous state
/// is back).
#[derive(Debug)]
pub(crate) struct AutocastGuard {
    cuda: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

/// Turns bf16 autocast on for `device`'s type (CUDA or CPU) on this thread.
pub(crate) fn bf16_autocast(device: tch::Device) -> Result<AutocastGuard, WorkerError> {
    let cuda = c_int::from(device.is_cuda());
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: the shim writes two ints and catches every C++ exception.
    match unsafe { mtl_autocast_enter_bf16(cuda, &mut prev_enabled, &mut prev_dtype) } {
        0 => Ok(AutocastGuard { cuda, prev_enabled, prev_dtype }),
        _ => Err(WorkerError::Device {
            device: format!("{device:?}"),
            message: "LibTorch refused to enable bf16 autocast".into(),
        }),
    }
}

/// Whether autocast is on for `device`'s type on this thread, and whether its dtype is bf16.
#[cfg(test)]
pub(crate) fn autocast_state(device: tch::Device) -> (bool, bool) {
    let (mut enabled, mut is_bf16) = (0, 0);
    // SAFETY: the shim writes two ints and catches every C++ exception.
    unsafe { mtl_autocast_state(c_int::from(device.is_cuda()), &mut enabled, &mut is_bf16) };
    (enabled != 0, is_bf16 != 0)
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: restores the state the enter call reported; exceptions are caught in C++.
        if unsafe { mtl_autocast_exit(self.cuda, self.prev_enabled, self.prev_dtype) } != 0 {
            tracing::error!("could not restore the autocast state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn cpu_autocast_runs_matmuls_in_bf16_and_restores_the_state() {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        let initial = autocast_state(Device::Cpu);
        assert!(!initial.0, "autocast starts off");
        {
            let _guard = bf16_autocast(Device::Cpu).unwrap();
            assert_eq!(autocast_state(Device::Cpu), (true, true));
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16, "autocast casts matmul inputs");
            {
                let _inner = bf16_autocast(Device::Cpu).unwrap();
                assert_eq!(autocast_state(Device::Cpu), (true, true));
            }
            assert_eq!(autocast_state(Device::Cpu), (true, true), "nesting restores the outer state");
        }
        assert_eq!(autocast_state(Device::Cpu), initial);
        assert_eq!(a.matmul(&a).kind(), Kind::Float, "off again");
    }

    #[test]
    fn cuda_autocast_runs_in_bf16_when_a_gpu_is_there() {
        if tch::Cuda::device_count() == 0 {
            assert!(
                std::env::var("MTL_REQUIRE_CUDA").is_err(),
                "MTL_REQUIRE_CUDA is set but no GPU is visible"
            );
            eprintln!("skipped: no CUDA");
            return;
        }
        let a = Tensor::ones([64, 64], (Kind::Float, Device::Cuda(0)));
        let _guard = bf16_autocast(Device::Cuda(0)).unwrap();
        assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
    }
}
