// See README.md. gloo's rendezvous store interface, as far as the inline
// GlooStore adapter in ProcessGroupGloo.hpp overrides it. This project never
// constructs a GlooStore (libtorch does, inside its own code), so the store
// v2 methods, which that adapter defines only under GLOO_STORE_HAS_STORE_V2,
// are left out and that macro stays undefined.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {

class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};

}  // namespace rendezvous
}  // namespace gloo
