// What every C function of csrc/ shares: C++ exceptions stay on this
// side, and come back to Rust as a malloc'ed message (NULL on success) that
// tch_cifar_free_message frees.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

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
