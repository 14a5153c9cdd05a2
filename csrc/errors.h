// Exception types of the core. bindings.cpp translates each into the Python exception callers expect
// (MemoryError lets the page allocator report "cannot allocate now" instead of crashing).
#pragma once

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace kvcached {

// Physical memory could not be committed (ENOSPC/ENOMEM, CUDA_ERROR_OUT_OF_MEMORY) -> MemoryError.
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A system call failed for a reason other than lack of memory -> OSError(errno, message).
struct SystemError : std::runtime_error {
  int err;
  SystemError(int e, const std::string& what) : std::runtime_error(what + ": " + std::strerror(e)), err(e) {}
};

// The CUDA driver returned an error -> RuntimeError with the driver's name and text.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws OutOfMemory for the errnos that mean "no memory", SystemError otherwise.
[[noreturn]] inline void throw_errno(int e, const std::string& what) {
  if (e == ENOSPC || e == ENOMEM) throw OutOfMemory(what + ": " + std::strerror(e));
  throw SystemError(e, what);
}

}  // namespace kvcached
