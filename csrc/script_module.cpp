// A TorchScript module built from named tensors and TorchScript source, as
// `torch.jit.script(net)` would make it in Python: the tensors become
// registered parameters (`conv1.weight` is parameter `weight` of submodule
// `conv1`), so `state_dict()`, `parameters()` and `.to(...)` work on it,
// and the methods are compiled from source. tch binds `torch::jit::Module`
// only for loading, so `export` builds and saves it here.
//
// C++ exceptions stay on this side: every error comes back as a message.
#include <torch/csrc/jit/api/module.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace {

char* copy_message(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

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

// Builds module `class_name` whose parameters are `tensors[i]` named
// `names[i]` ("param" or "submodule.param", registered in this order),
// defines `source` on it, and saves it to `path`. The tensors are copied;
// the copies require grad, like a scripted `nn.Module`'s parameters.
// Returns NULL on success, else an error message to free with
// `tch_cifar_free_message`.
extern "C" char* tch_cifar_save_script_module(
    const char* class_name,
    const char* const* names,
    const at::Tensor* const* tensors,
    size_t count,
    const char* source,
    const char* path) {
  try {
    auto cu = std::make_shared<torch::jit::CompilationUnit>();
    const std::string root_class(class_name);
    torch::jit::Module root = new_module(root_class, cu);
    for (size_t i = 0; i < count; i++) {
      const std::string name(names[i]);
      at::Tensor value = tensors[i]->detach().clone().contiguous();
      value.set_requires_grad(true);
      const auto dot = name.find('.');
      if (dot == std::string::npos) {
        root.register_parameter(name, value, /*is_buffer=*/false);
        continue;
      }
      const std::string leaf = name.substr(dot + 1);
      if (leaf.find('.') != std::string::npos) {
        return copy_message("parameter name " + name + " is nested more than one level deep");
      }
      torch::jit::Module sub = submodule(root, root_class, name.substr(0, dot), cu);
      sub.register_parameter(leaf, value, /*is_buffer=*/false);
    }
    root.define(source);
    root.save(path);
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

extern "C" void tch_cifar_free_message(char* message) {
  std::free(message);
}
