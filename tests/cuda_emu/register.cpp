// The emulated CUDA backend as torch ops, for the tests in this folder:
//   udat_kernels::margin_ce_fwd_emu / margin_ce_bwd_emu  the host side of csrc/cuda run on CPU
//       tensors, every kernel under the emulator; the schema is the compiled pair's, renamed, so
//       the loss op udat_kernels::margin_ce reaches them with impl "emu" (autograd included);
//   udat_kernels::margin_ce_shard_fwd_emu / margin_ce_shard_bwd_emu  the CUDA shard mode, the
//       same way (the shard mode's suffix "emu": udat_kernels.distributed.shard_mode.COMPILED);
//   udat_cuda_emu::set_config / get_config / log / clear_log  the emulator's settings (seed,
//       emulated multiprocessors, free memory, ...) and its log of launches and GEMMs.
// Load udat_kernels (its _C defines the schema) before this library.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cuda/margin_ce_cuda.h"
#include "emulator.h"

namespace {

udat::FwdResult fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                    const udat::OptTensor& bias, const udat::OptTensor& class_weight,
                    const udat::OptTensor& sample_weight, const udat::OptTensor& grl_lambda,
                    bool normalize, double scale, double margin, double cos_margin,
                    double label_smoothing, int64_t ignore_index, int64_t reduction,
                    bool straight_through, bool compute_grad) {
  udat::emu::begin_call();
  return udat::cuda::margin_ce_fwd_cuda(x, weight, target, bias, class_weight, sample_weight,
                                        grl_lambda, normalize, scale, margin, cos_margin,
                                        label_smoothing, ignore_index, reduction,
                                        straight_through, compute_grad);
}

udat::BwdResult bwd(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
                    const at::Tensor& target, const udat::OptTensor& bias,
                    const udat::OptTensor& class_weight, const udat::OptTensor& sample_weight,
                    const at::Tensor& lse, const udat::OptTensor& grl_lambda, bool normalize,
                    double scale, double margin, double cos_margin, double label_smoothing,
                    int64_t ignore_index, int64_t reduction, bool straight_through) {
  udat::emu::begin_call();
  return udat::cuda::margin_ce_bwd_cuda(grad_loss, x, weight, target, bias, class_weight,
                                        sample_weight, lse, grl_lambda, normalize, scale, margin,
                                        cos_margin, label_smoothing, ignore_index, reduction,
                                        straight_through);
}

udat::ShardFwdResult shard_fwd(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& target, const udat::OptTensor& bias,
                               const udat::OptTensor& class_weight,
                               const udat::OptTensor& sample_weight, int64_t class_offset,
                               int64_t num_classes, bool normalize, double scale, double margin,
                               double cos_margin, double label_smoothing, int64_t ignore_index,
                               bool straight_through) {
  udat::emu::begin_call();
  return udat::cuda::margin_ce_shard_fwd_cuda(x, weight, target, bias, class_weight,
                                              sample_weight, class_offset, num_classes, normalize,
                                              scale, margin, cos_margin, label_smoothing,
                                              ignore_index, straight_through);
}

udat::BwdResult shard_bwd(const at::Tensor& grad_rows, const at::Tensor& x,
                          const at::Tensor& weight, const at::Tensor& target,
                          const udat::OptTensor& bias, const udat::OptTensor& class_weight,
                          const udat::OptTensor& sample_weight, const at::Tensor& lse,
                          const udat::OptTensor& grl_lambda, int64_t class_offset,
                          int64_t num_classes, bool normalize, double scale, double margin,
                          double cos_margin, double label_smoothing, int64_t ignore_index,
                          bool straight_through) {
  udat::emu::begin_call();
  return udat::cuda::margin_ce_shard_bwd_cuda(grad_rows, x, weight, target, bias, class_weight,
                                              sample_weight, lse, grl_lambda, class_offset,
                                              num_classes, normalize, scale, margin, cos_margin,
                                              label_smoothing, ignore_index, straight_through);
}

c10::FunctionSchema renamed(const char* from, const char* to) {
  const auto op = c10::Dispatcher::singleton().findSchema({from, ""});
  TORCH_CHECK(op.has_value(), "CUDA emulator: ", from,
              " is not registered: import udat_kernels before loading this library");
  return op->schema().cloneWithName(to, "");
}

void set_config(std::string key, int64_t value) { udat::emu::set_config(key, value); }
int64_t get_config(std::string key) { return udat::emu::get_config(key); }
std::string emu_log() { return udat::emu::log_json(); }
void clear_log() { udat::emu::clear_log(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(udat_kernels, m) {
  m.def(renamed("udat_kernels::margin_ce_fwd", "udat_kernels::margin_ce_fwd_emu"));
  m.def(renamed("udat_kernels::margin_ce_bwd", "udat_kernels::margin_ce_bwd_emu"));
  m.impl("margin_ce_fwd_emu", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(fwd)));
  m.impl("margin_ce_bwd_emu", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(bwd)));
  // Differentiable through margin_ce only, like the other pairs.
  m.impl("margin_ce_fwd_emu",
         torch::dispatch(c10::DispatchKey::Autograd, torch::CppFunction::makeFallthrough()));
  m.impl("margin_ce_bwd_emu",
         torch::dispatch(c10::DispatchKey::Autograd, torch::CppFunction::makeFallthrough()));
  m.def(renamed("udat_kernels::margin_ce_shard_fwd", "udat_kernels::margin_ce_shard_fwd_emu"));
  m.def(renamed("udat_kernels::margin_ce_shard_bwd", "udat_kernels::margin_ce_shard_bwd_emu"));
  m.impl("margin_ce_shard_fwd_emu", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(shard_fwd)));
  m.impl("margin_ce_shard_bwd_emu", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(shard_bwd)));
  m.impl("margin_ce_shard_fwd_emu",
         torch::dispatch(c10::DispatchKey::Autograd, torch::CppFunction::makeFallthrough()));
  m.impl("margin_ce_shard_bwd_emu",
         torch::dispatch(c10::DispatchKey::Autograd, torch::CppFunction::makeFallthrough()));
}

TORCH_LIBRARY(udat_cuda_emu, m) {
  m.def("set_config(str key, int value) -> ()", &set_config);
  m.def("get_config(str key) -> int", &get_config);
  m.def("log() -> str", &emu_log);
  m.def("clear_log() -> ()", &clear_log);
}
