// CUDA graphs of the training step (`train.cuda_graphs`, worker/src/train/graph.rs) and the
// side stream they are captured and replayed on: tch 0.24 exposes neither. Built with CUDA
// when build.rs finds LibTorch's CUDA library and the CUDA runtime headers (MTL_CUDA); without
// them every entry point fails with a message saying so.
//
// A graph is an `at::cuda::CUDAGraph` behind an opaque pointer. Capture uses
// cudaStreamCaptureModeThreadLocal: the capturing thread may not make unsafe CUDA calls (a host
// read inside the step fails the capture instead of being recorded), while other threads (the
// loader's pinned allocations) go on; the autograd engine's device thread enqueues backward onto
// the capturing stream, which records it.
#include "guard.h"

#include <cstddef>

#ifdef MTL_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using mtl_shim::guarded;

#ifdef MTL_CUDA
at::cuda::CUDAGraph* graph(void* g) {
  TORCH_CHECK(g != nullptr, "no graph");
  return static_cast<at::cuda::CUDAGraph*>(g);
}
#else
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "this worker was built without the CUDA headers (no CUDA graphs)");
}
#endif

}  // namespace

extern "C" {

// 1 when this shim was built with CUDA graphs, else 0.
int mtl_cuda_graphs_built() {
#ifdef MTL_CUDA
  return 1;
#else
  return 0;
#endif
}

// Makes this thread's current stream on CUDA device `device` one of LibTorch's pool streams
// (graphs cannot be captured on the legacy default stream), after every kernel queued on the
// device has finished; nothing when the current stream is already not the default one.
int mtl_cuda_side_stream(int device, char* err, size_t err_len) {
  return guarded("cuda side stream", err, err_len, [&] {
#ifdef MTL_CUDA
    auto index = static_cast<c10::DeviceIndex>(device);
    // The generic guard: CUDAGuard's inline implementation would need libcudart at link time.
    c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, index));
    if (c10::cuda::getCurrentCUDAStream(index) != c10::cuda::getDefaultCUDAStream(index)) {
      return;
    }
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index));
#else
    (void)device;
    no_cuda();
#endif
  });
}

// A new, empty graph in `*out` (free it with `mtl_cuda_graph_free`).
int mtl_cuda_graph_new(void** out, char* err, size_t err_len) {
  return guarded("cuda graph", err, err_len, [&] {
#ifdef MTL_CUDA
    *out = new at::cuda::CUDAGraph();
#else
    (void)out;
    no_cuda();
#endif
  });
}

// Waits for the device, then starts capturing this thread's current stream into `g`, with a
// private memory pool (what the captured step allocates stays reserved for its replays).
int mtl_cuda_graph_capture_begin(void* g, char* err, size_t err_len) {
  return guarded("cuda graph capture_begin", err, err_len, [&] {
#ifdef MTL_CUDA
    auto* gr = graph(g);
    c10::cuda::device_synchronize();
    gr->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
#else
    (void)g;
    no_cuda();
#endif
  });
}

// Ends the capture begun on `g` and instantiates the graph. Also the way out of a capture
// whose step failed: the graph is then unusable, and the caller stops training (LibTorch's
// allocators may still count that capture as under way).
int mtl_cuda_graph_capture_end(void* g, char* err, size_t err_len) {
  return guarded("cuda graph capture_end", err, err_len, [&] {
#ifdef MTL_CUDA
    graph(g)->capture_end();
#else
    (void)g;
    no_cuda();
#endif
  });
}

// Launches the captured work on this thread's current stream, without waiting for it.
int mtl_cuda_graph_replay(void* g, char* err, size_t err_len) {
  return guarded("cuda graph replay", err, err_len, [&] {
#ifdef MTL_CUDA
    graph(g)->replay();
#else
    (void)g;
    no_cuda();
#endif
  });
}

// Frees a graph from `mtl_cuda_graph_new` (null is allowed).
void mtl_cuda_graph_free(void* g) {
#ifdef MTL_CUDA
  guarded([&] { delete static_cast<at::cuda::CUDAGraph*>(g); });
#else
  (void)g;
#endif
}

}  // extern "C"
