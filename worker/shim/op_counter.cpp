// Counts the LibTorch ops a piece of code dispatches, through LibTorch's RecordFunction callbacks:
// how a CPU test checks that a GPU training step neither launches too many kernels nor waits for
// the device. The callback is thread-local: it sees the ops of the thread that starts counting
// and of the autograd threads working for it (LibTorch carries the callbacks to them), not other
// threads'. Nested ops are counted too (an op's implementation calling other ops).
// Errors never cross the C boundary: functions return 0 on success, 1 on an exception.
#include <ATen/record_function.h>
#include <ATen/core/ivalue.h>

#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>

namespace {

struct Count {
  uint64_t calls = 0;
  uint64_t host_reads = 0;
};

std::mutex counts_mutex;
std::map<std::string, Count> counts;
std::optional<at::CallbackHandle> handle;

// Ops that make the host wait for the device: reading a value, or an output whose size depends
// on the data.
bool reads_values(const char* name) {
  static const char* const names[] = {
      "aten::_local_scalar_dense", "aten::item",          "aten::nonzero",     "aten::nonzero_numpy",
      "aten::is_nonzero",          "aten::equal",         "aten::allclose",    "aten::masked_select",
      "aten::_unique",             "aten::_unique2",      "aten::unique_dim",  "aten::unique_consecutive",
  };
  for (const char* n : names) {
    if (std::strcmp(name, n) == 0) return true;
  }
  return false;
}

// A copy into host memory from a device.
bool copies_to_host(const at::RecordFunction& fn) {
  // Some call sites record an op without its inputs: nothing to inspect then.
  if (std::strcmp(fn.name(), "aten::copy_") != 0 || fn.num_inputs() < 2) return false;
  auto inputs = fn.inputs();
  if (inputs.size() < 2 || !inputs[0].isTensor() || !inputs[1].isTensor()) return false;
  const auto& dst = inputs[0].toTensor();
  const auto& src = inputs[1].toTensor();
  return dst.defined() && src.defined() && dst.is_cpu() && !src.is_cpu();
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  bool host_read = reads_values(fn.name()) || copies_to_host(fn);
  std::lock_guard<std::mutex> lock(counts_mutex);
  Count& c = counts[fn.name()];
  c.calls += 1;
  c.host_reads += host_read ? 1 : 0;
  return nullptr;
}

}  // namespace

extern "C" {

// Starts counting on this thread from zero. Fails if counting is already on.
int mtl_opcount_start() {
  try {
    if (handle) return 1;
    {
      std::lock_guard<std::mutex> lock(counts_mutex);
      counts.clear();
    }
    handle = at::addThreadLocalCallback(
        at::RecordFunctionCallback(on_start).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
    return 0;
  } catch (...) {
    return 1;
  }
}

// Stops counting (on the thread that started it).
int mtl_opcount_stop() {
  try {
    if (handle) {
      at::removeCallback(*handle);
      handle.reset();
    }
    return 0;
  } catch (...) {
    return 1;
  }
}

// Writes the counts as lines "name<TAB>calls<TAB>host_reads\n" into `buf` (up to `cap` bytes)
// and returns the length of the whole text: call again with a larger buffer if it is more.
size_t mtl_opcount_report(char* buf, size_t cap) {
  std::string text;
  {
    std::lock_guard<std::mutex> lock(counts_mutex);
    for (const auto& [name, c] : counts) {
      text += name + "\t" + std::to_string(c.calls) + "\t" + std::to_string(c.host_reads) + "\n";
    }
  }
  if (cap > 0) std::memcpy(buf, text.data(), std::min(cap, text.size()));
  return text.size();
}
}
