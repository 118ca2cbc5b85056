// libtorch's own profiler (Kineto, CPU activities), which tch does not
// bind: `train --profile` records one step with it and saves the Chrome
// trace that torch.profiler's export_chrome_trace writes, so a step of
// tch-cifar and one of the PyTorch reference are read the same way
// (scripts/profile-summary.py).
#include <torch/csrc/autograd/profiler_kineto.h>

#include <set>

#include "ffi.h"

namespace {

using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

ProfilerConfig config() {
  return ProfilerConfig(ProfilerState::KINETO, /*report_input_shapes=*/false,
                        /*profile_memory=*/false, /*with_stack=*/false,
                        /*with_flops=*/false, /*with_modules=*/false);
}

const std::set<ActivityType> activities{ActivityType::CPU};

}  // namespace

// Starts recording every operator on this thread and those it starts.
// Returns NULL on success, else a message to free with tch_cifar_free_message.
extern "C" char* tch_cifar_profiler_start() {
  return tch_cifar::guarded([] {
    torch::autograd::profiler::prepareProfiler(config(), activities);
    torch::autograd::profiler::enableProfiler(config(), activities);
  });
}

// Stops recording and writes the trace to `path` (Chrome trace JSON).
extern "C" char* tch_cifar_profiler_stop(const char* path) {
  return tch_cifar::guarded([path] {
    auto result = torch::autograd::profiler::disableProfiler();
    result->save(path);
  });
}

// Stops recording and drops what was recorded.
extern "C" char* tch_cifar_profiler_discard() {
  return tch_cifar::guarded([] { torch::autograd::profiler::disableProfiler(); });
}
