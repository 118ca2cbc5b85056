// libtorch's c10d, as far as data-parallel training needs it: the TCPStore
// rendezvous (as torchrun and torch.distributed use it), ProcessGroupGloo,
// and the collectives (all-reduce, broadcast) through the
// c10d::Backend interface that every process group implements. tch binds
// none of it.
//
// ProcessGroupGloo.hpp includes gloo's headers, which the PyTorch wheel does
// not ship: csrc/gloo/ declares the few names it needs (see its README.md).
//
// C++ exceptions stay on this side: every error comes back as a malloc'ed
// message (NULL on success), freed with tch_cifar_free_message. NCCL's
// process group is made in csrc/distributed_nccl.cpp, a library of its own
// that is loaded only with libtorch's CUDA half; its collectives run here,
// through the same c10d::Backend interface.
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "distributed.h"

using tch_cifar::guarded;

extern "C" {

// Silences libtorch's own C++ log lines (c10d logs each failed connection
// with a C++ backtrace): every error comes back through these functions'
// messages instead.
void tch_cifar_quiet_cpp_logs() { FLAGS_caffe2_log_level = c10::GLOG_FATAL; }

// Connects to (or, with is_server, also hosts) the TCPStore at host:port.
// A non-empty prefix puts every key under it, as torchrun's agent store
// expects of its workers ("/worker/attempt_N").
char* tch_cifar_store_new(const char* host, uint16_t port, int64_t world_size, bool is_server,
                          int64_t timeout_ms, const char* prefix, TchCifarStore** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    opts.numWorkers = static_cast<size_t>(world_size);
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    if (prefix != nullptr && prefix[0] != '\0') {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
    }
    *out = new TchCifarStore{store};
  });
}

// A second connection to the same store, for another thread.
char* tch_cifar_store_clone(TchCifarStore* store, TchCifarStore** out) {
  return guarded([&] { *out = new TchCifarStore{store->store->clone()}; });
}

char* tch_cifar_store_set(TchCifarStore* store, const char* key, const uint8_t* value,
                          size_t len) {
  return guarded([&] { store->store->set(key, std::vector<uint8_t>(value, value + len)); });
}

// The value of `key` if it is set (*found = true), without waiting.
// The bytes are malloc'ed; free them with tch_cifar_free_message.
char* tch_cifar_store_try_get(TchCifarStore* store, const char* key, bool* found,
                              uint8_t** value, size_t* len) {
  return guarded([&] {
    *found = store->store->check({key});
    *value = nullptr;
    *len = 0;
    if (*found) {
      std::vector<uint8_t> bytes = store->store->get(key);
      *value = static_cast<uint8_t*>(std::malloc(bytes.size() + 1));
      if (*value == nullptr) {
        throw std::bad_alloc();
      }
      std::memcpy(*value, bytes.data(), bytes.size());
      *len = bytes.size();
    }
  });
}

// The value of `key`, waiting for it up to the store's timeout. The bytes
// are malloc'ed; free them with tch_cifar_free_message.
char* tch_cifar_store_get(TchCifarStore* store, const char* key, uint8_t** value, size_t* len) {
  return guarded([&] {
    std::vector<uint8_t> bytes = store->store->get(key);
    *value = static_cast<uint8_t*>(std::malloc(bytes.size() + 1));
    if (*value == nullptr) {
      throw std::bad_alloc();
    }
    std::memcpy(*value, bytes.data(), bytes.size());
    *len = bytes.size();
  });
}

void tch_cifar_store_free(TchCifarStore* store) { delete store; }

// A Gloo process group of `world_size` ranks over `store`. Its transport
// binds to `hostname` (an address or a name) if given, else to each of the
// comma-separated network `interfaces` if given (torch.distributed's
// GLOO_SOCKET_IFNAME), else to what c10d picks (the host name's address).
char* tch_cifar_group_new_gloo(TchCifarStore* store, int rank, int world_size,
                               int64_t timeout_ms, const char* hostname, const char* interfaces,
                               TchCifarGroup** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> options;
    if (hostname != nullptr) {
      options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    } else if (interfaces != nullptr) {
      options = c10d::ProcessGroupGloo::Options::create(timeout);
      std::string names(interfaces);
      size_t start = 0;
      while (start <= names.size()) {
        size_t end = names.find(',', start);
        if (end == std::string::npos) {
          end = names.size();
        }
        if (end > start) {
          options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(
              names.substr(start, end - start)));
        }
        start = end + 1;
      }
      // As torch.distributed does: two threads per device.
      options->threads = static_cast<int>(options->devices.size()) * 2;
    } else {
      options = c10d::ProcessGroupGloo::Options::create_default(timeout);
    }
    auto group =
        c10::make_intrusive<c10d::ProcessGroupGloo>(store->store, rank, world_size, options);
    *out = new TchCifarGroup{group};
  });
}

// Sums `tensor` (in place) over every rank, and waits for the result.
char* tch_cifar_group_all_reduce_sum(TchCifarGroup* group, at::Tensor* tensor) {
  return guarded([&] {
    std::vector<at::Tensor> list{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    group->backend->allreduce(list, opts)->wait();
  });
}

// Copies rank `root`'s `tensor` into every rank's, and waits.
char* tch_cifar_group_broadcast(TchCifarGroup* group, at::Tensor* tensor, int64_t root) {
  return guarded([&] {
    std::vector<at::Tensor> list{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    group->backend->broadcast(list, opts)->wait();
  });
}

void tch_cifar_group_free(TchCifarGroup* group) { delete group; }

}  // extern "C"
