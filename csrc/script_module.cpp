// A TorchScript module built from named tensors and TorchScript source, as
// `torch.jit.script(net)` would make it in Python: the tensors become
// registered parameters and buffers (`conv1.weight` is parameter `weight`
// of submodule `conv1`, `layer1.norm1.running_mean` a buffer of submodule
// `norm1` of `layer1`), so `state_dict()`, `parameters()` and `.to(...)` work on it,
// and the methods are compiled from source. tch binds `torch::jit::Module`
// only for loading, so `export` builds and saves it here.
//
// C++ exceptions stay on this side: every error comes back as a message
// (csrc/ffi.h).
#include <torch/csrc/jit/api/module.h>

#include "ffi.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace {

// A module with no methods yet, and the `training` flag that
// `Module::train()` and Python's `.train()`/`.eval()` expect on every module.
torch::jit::Module new_module(
    const std::string& class_name,
    const std::shared_ptr<torch::jit::CompilationUnit>& cu) {
  torch::jit::Module module(c10::QualifiedName("__torch__." + class_name), cu);
  module.register_attribute("training", c10::BoolType::get(), false);
  return module;
}

// The submodule `name` of `root`, created (as class `Root_name`) if needed.
torch::jit::Module submodule(
    torch::jit::Module& root,
    const std::string& root_class,
    const std::string& name,
    const std::shared_ptr<torch::jit::CompilationUnit>& cu) {
  if (root.hasattr(name)) {
    return root.attr(name).toModule();
  }
  torch::jit::Module sub = new_module(root_class + "_" + name, cu);
  root.register_module(name, sub);
  return sub;
}

}  // namespace

// What `tch_cifar_save_script_module` makes of each tensor.
enum TensorRole : int32_t {
  kParameter = 0,        // a parameter that trains (requires grad)
  kFrozenParameter = 1,  // a parameter that does not (requires_grad=False)
  kBuffer = 2,           // a buffer: BatchNorm's running statistics
};

// Builds module `class_name` whose parameters and buffers are `tensors[i]`
// named `names[i]` ("param", "submodule.param", "a.b.param": submodules
// are created as needed, in this order) with `roles[i]`, defines `source`
// on it, and saves it to `path`. The tensors are copied; the copies of
// trainable parameters require grad, like a scripted `nn.Module`'s.
// Returns NULL on success, else an error message to free with
// `tch_cifar_free_message`.
extern "C" char* tch_cifar_save_script_module(
    const char* class_name,
    const char* const* names,
    const at::Tensor* const* tensors,
    const int32_t* roles,
    size_t count,
    const char* source,
    const char* path) {
  return tch_cifar::guarded([&] {
    auto cu = std::make_shared<torch::jit::CompilationUnit>();
    const std::string root_class(class_name);
    torch::jit::Module root = new_module(root_class, cu);
    for (size_t i = 0; i < count; i++) {
      const std::string name(names[i]);
      at::Tensor value = tensors[i]->detach().clone().contiguous();
      if (roles[i] == kParameter) {
        value.set_requires_grad(true);
      } else if (roles[i] != kFrozenParameter && roles[i] != kBuffer) {
        throw std::invalid_argument("tensor " + name + " has an unknown role");
      }
      // Walk (and create) the submodules down to the leaf's owner.
      torch::jit::Module owner = root;
      std::string owner_class = root_class;
      size_t start = 0;
      for (size_t dot = name.find('.'); dot != std::string::npos;
           dot = name.find('.', start)) {
        const std::string part = name.substr(start, dot - start);
        owner = submodule(owner, owner_class, part, cu);
        owner_class += "_" + part;
        start = dot + 1;
      }
      const std::string leaf = name.substr(start);
      if (roles[i] == kBuffer) {
        owner.register_buffer(leaf, value);
      } else {
        owner.register_parameter(leaf, value, /*is_buffer=*/false);
      }
    }
    root.define(source);
    root.save(path);
  });
}

extern "C" void tch_cifar_free_message(char* message) {
  std::free(message);
}
