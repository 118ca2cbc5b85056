// The handles that csrc/distributed.cpp and csrc/distributed_nccl.cpp share.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "ffi.h"

// An opaque handle to a c10d store (a TCPStore, maybe behind a prefix).
struct TchCifarStore {
  c10::intrusive_ptr<c10d::Store> store;
};

// An opaque handle to a process group's backend (Gloo or NCCL).
struct TchCifarGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
};
