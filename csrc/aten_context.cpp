// The one libtorch setting tch-cifar needs that tch has no binding for:
// PyTorch's `torch.backends.mkldnn.enabled`, which picks oneDNN (on) or
// ATen's own im2col + GEMM kernel (off) for CPU convolutions.
#include <ATen/Context.h>

extern "C" void tch_cifar_set_mkldnn_enabled(bool enabled) {
  at::globalContext().setUserEnabledMkldnn(enabled);
}

extern "C" bool tch_cifar_mkldnn_enabled() {
  return at::globalContext().userEnabledMkldnn();
}
