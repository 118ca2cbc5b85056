// Autocast for any device, which tch cannot give: its `autocast` switches
// CUDA's on (`at::autocast::set_enabled`) and leaves the dtype at float16.
// The CPU's runs in bfloat16, as `torch.autocast("cpu", dtype=torch.bfloat16)`
// sets it: the state is thread-local, as Python's, and the cache of casted
// weights lives until the outermost region ends.
#include <ATen/autocast_mode.h>

namespace {

at::DeviceType device_type(bool cuda) { return cuda ? at::kCUDA : at::kCPU; }

}  // namespace

// Enters an autocast region on the CPU (cuda false) or CUDA, in bfloat16
// (bf16 true) or float16. Writes the state it replaced, for
// tch_cifar_autocast_exit.
extern "C" void tch_cifar_autocast_enter(bool cuda, bool bf16, bool* was_enabled,
                                         int* was_dtype) {
  const auto device = device_type(cuda);
  *was_enabled = at::autocast::is_autocast_enabled(device);
  *was_dtype = static_cast<int>(at::autocast::get_autocast_dtype(device));
  at::autocast::set_autocast_enabled(device, true);
  at::autocast::set_autocast_dtype(device, bf16 ? at::kBFloat16 : at::kHalf);
  at::autocast::increment_nesting();
}

extern "C" void tch_cifar_autocast_exit(bool cuda, bool was_enabled, int was_dtype) {
  const auto device = device_type(cuda);
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(device, was_enabled);
  at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(was_dtype));
}
