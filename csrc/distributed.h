// The handles that csrc/distributed.cpp and csrc/distributed_nccl.cpp share.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

// An opaque handle to a c10d store (a TCPStore, maybe behind a prefix).
struct TchCifarStore {
  c10::intrusive_ptr<c10d::Store> store;
};

// An opaque handle to a process group's backend (Gloo or NCCL).
struct TchCifarGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace tch_cifar {

inline char* copy_message(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

// Runs `body`, turning any exception into a malloc'ed message (NULL when
// none). c10's errors carry a C++ backtrace after their message, which is
// not for a user's eyes.
template <typename F>
char* guarded(F body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

}  // namespace tch_cifar
