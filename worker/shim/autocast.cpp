// The autocast controls tch 0.24 does not expose: its autocast is fp16 on CUDA only. These set
// the autocast dtype per device type, so training can run its forward pass in bf16.
// Errors never cross the C boundary: every function returns 0 on success, 1 on an exception.
#include <ATen/autocast_mode.h>

#include "guard.h"

namespace {
c10::DeviceType device_type(int cuda) { return cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }
}  // namespace

extern "C" {

// Turns bf16 autocast on for CUDA (cuda != 0) or CPU; reports the previous state for exit.
int mtl_autocast_enter_bf16(int cuda, int* prev_enabled, int* prev_dtype) {
  return mtl_shim::guarded([&] {
    auto d = device_type(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(d));
    at::autocast::set_autocast_enabled(d, true);
    at::autocast::set_autocast_dtype(d, at::kBFloat16);
    at::autocast::increment_nesting();
  });
}

// Restores the state `mtl_autocast_enter_bf16` reported; drops the cast cache at the outermost exit.
int mtl_autocast_exit(int cuda, int prev_enabled, int prev_dtype) {
  return mtl_shim::guarded([&] {
    auto d = device_type(cuda);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(d, prev_enabled != 0);
    at::autocast::set_autocast_dtype(d, static_cast<at::ScalarType>(prev_dtype));
  });
}

// Whether autocast is on for the device type, and with which dtype (1 = bf16).
int mtl_autocast_state(int cuda, int* enabled, int* is_bf16) {
  return mtl_shim::guarded([&] {
    auto d = device_type(cuda);
    *enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
    *is_bf16 = at::autocast::get_autocast_dtype(d) == at::kBFloat16 ? 1 : 0;
  });
}
}
