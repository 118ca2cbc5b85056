// See README.md. gloo::Context is only held through std::shared_ptr by
// ProcessGroupGloo; its inline setTimeout() calls the method declared here.
#pragma once

#include <chrono>

namespace gloo {

class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
