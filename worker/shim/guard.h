// How every shim entry point reports failure: exceptions never cross the C boundary; an entry
// point returns 0 on success, otherwise 1 with a NUL-terminated message of at most `err_len`
// bytes in `err`.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <string>
#include <utility>

namespace mtl_shim {

// Writes `message` (cut to fit) into `err`.
inline void write_message(const std::string& message, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) {
    return;
  }
  std::strncpy(err, message.c_str(), err_len - 1);
  err[err_len - 1] = '\0';
}

// Runs `f`, turning any exception into status 1 and a message prefixed with `op`.
template <typename F>
int guarded(const char* op, char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    write_message(std::string(op) + ": " + e.what_without_backtrace(), err, err_len);
  } catch (const std::exception& e) {
    write_message(std::string(op) + ": " + e.what(), err, err_len);
  } catch (...) {
    write_message(op, err, err_len);
  }
  return 1;
}

// `guarded` for entry points that report failure by status alone.
template <typename F>
int guarded(F&& f) {
  return guarded("", nullptr, 0, std::forward<F>(f));
}

}  // namespace mtl_shim
