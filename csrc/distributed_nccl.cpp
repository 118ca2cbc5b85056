// c10d's ProcessGroupNCCL, made for csrc/distributed.cpp's collectives.
//
// It lives in a shared library of its own (build.rs links it, src/distributed
// loads it) because its symbols are in libtorch_cuda.so, which tch-cifar
// loads only when a command asks for CUDA (src/device.rs); that load makes
// them global, and this library's references resolve against them.
#define USE_C10D_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstdint>

#include "distributed.h"

extern "C" {

// An NCCL process group of `world_size` ranks over `store`; this rank's
// GPU is the current CUDA device of the collectives' tensors.
char* tch_cifar_group_new_nccl(TchCifarStore* store, int rank, int world_size,
                               int64_t timeout_ms, TchCifarGroup** out) {
  return tch_cifar::guarded([&] {
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    auto group =
        c10::make_intrusive<c10d::ProcessGroupNCCL>(store->store, rank, world_size, options);
    *out = new TchCifarGroup{group};
  });
}

}  // extern "C"
