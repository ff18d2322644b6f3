// Schema of the fused cross-entropy ops (declared once for every backend) and the argument
// checks they share. See docs/design.md for what each output holds.
#include "udat_ce.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>

namespace udat {

CeOptions make_options(bool normalize, double scale, double margin, double cos_margin,
                       double label_smoothing, int64_t ignore_index, int64_t reduction,
                       bool straight_through) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "reduction: expected 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  CeOptions opt;
  opt.normalize = normalize;
  opt.scale = normalize ? scale : 1.0;
  opt.margin = normalize ? margin : 0.0;
  opt.cos_margin = normalize ? cos_margin : 0.0;
  opt.label_smoothing = label_smoothing;
  opt.ignore_index = ignore_index;
  opt.reduction = static_cast<Reduction>(reduction);
  opt.straight_through = straight_through;
  return opt;
}

static bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

static void check_vector(const OptTensor& t, const char* name, int64_t n, const char* what,
                         const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK_TYPE(is_float(t->scalar_type()), name, ": expected a floating-point tensor, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, name, ": expected shape (", n, ",) (",
                    what, "), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), name, ": expected a tensor on ", x.device(),
                    " like x, got ", t->device());
}

// The checks of both op families. `classes` is the length class_weight must have; the weight may
// be empty only in the shard mode.
static void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                         const OptTensor& bias, const OptTensor& class_weight,
                         const OptTensor& sample_weight, const CeOptions& opt, bool shard,
                         int64_t classes) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor (B, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected a 2-D tensor (C, D), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "weight: expected (C, ", x.size(1),
                    ") to match x's feature size, got ", weight.sizes());
  TORCH_CHECK_VALUE(shard || weight.size(0) >= 1, "weight: needs at least one class, got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "x: expected float32/float16/bfloat16/float64, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(is_float(weight.scalar_type()),
                   "weight: expected float32/float16/bfloat16/float64, got ", weight.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target: expected int64 class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == x.size(0),
                    "target: expected shape (", x.size(0), ",) to match x's batch, got ",
                    target.sizes());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight: expected a tensor on ", x.device(),
                    " like x, got ", weight.device());
  TORCH_CHECK_VALUE(target.device() == x.device(), "target: expected a tensor on ", x.device(),
                    " like x, got ", target.device());
  const int64_t C = weight.size(0);
  check_vector(bias, "bias", C, shard ? "one per class of the shard" : "one per class", x);
  check_vector(class_weight, "class_weight", classes,
               shard ? "one per class of the whole problem, num_classes" : "one per class", x);
  check_vector(sample_weight, "sample_weight", x.size(0), "one per row of x", x);
  TORCH_CHECK_VALUE(!(bias.has_value() && opt.normalize),
                    "bias: the angular head has no bias (normalize=True)");
  if (opt.normalize) {
    TORCH_CHECK_VALUE(std::isfinite(opt.scale) && opt.scale > 0,
                      "scale: expected a finite positive number, got ", opt.scale);
    TORCH_CHECK_VALUE(opt.margin >= 0 && opt.margin < 3.14159265358979323846,
                      "margin: expected 0 <= margin < pi (radians), got ", opt.margin);
    TORCH_CHECK_VALUE(std::isfinite(opt.cos_margin) && opt.cos_margin >= 0,
                      "cos_margin: expected a finite number >= 0, got ", opt.cos_margin);
  }
  TORCH_CHECK_VALUE(opt.label_smoothing >= 0 && opt.label_smoothing < 1,
                    "label_smoothing: expected 0 <= label_smoothing < 1, got ",
                    opt.label_smoothing);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                  const OptTensor& bias, const OptTensor& class_weight,
                  const OptTensor& sample_weight, const CeOptions& opt) {
  const int64_t C = weight.dim() == 2 ? weight.size(0) : 0;
  check_common(x, weight, target, bias, class_weight, sample_weight, opt, false, C);
}

void check_shard_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                        const OptTensor& bias, const OptTensor& class_weight,
                        const OptTensor& sample_weight, const CeOptions& opt,
                        int64_t class_offset, int64_t num_classes) {
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes: expected at least one class, got ",
                    num_classes);
  check_common(x, weight, target, bias, class_weight, sample_weight, opt, true, num_classes);
  const int64_t C_l = weight.size(0);
  TORCH_CHECK_VALUE(class_offset >= 0 && class_offset <= num_classes - C_l,
                    "class_offset: the shard's classes [class_offset, class_offset + ", C_l,
                    ") must lie in [0, num_classes = ", num_classes, "), got class_offset ",
                    class_offset);
}

void check_shard_rows(const at::Tensor& x, const at::Tensor& grad_rows, const at::Tensor& lse) {
  const auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(is_float(t.scalar_type()), name, ": expected a floating-point tensor, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), name, ": expected shape (",
                      x.size(0), ",) (one per row of x), got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected a tensor on ", x.device(),
                      " like x, got ", t.device());
  };
  check(grad_rows, "grad_rows");
  check(lse, "lse");
}

ShardFwdResult empty_shard_forward(const at::Tensor& x, const at::Tensor& target,
                                   at::ScalarType dtype, int64_t ignore_index,
                                   int64_t num_classes) {
  const auto opts = x.options().dtype(dtype);
  const int64_t B = x.size(0);
  const at::Tensor bad =
      target.ne(ignore_index).logical_and(target.lt(0).logical_or(target.ge(num_classes)));
  return {at::full({B}, -std::numeric_limits<double>::infinity(), opts),
          at::zeros({B}, opts).masked_fill_(bad, std::numeric_limits<double>::quiet_NaN())};
}

BwdResult empty_shard_backward(const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, at::ScalarType dtype) {
  const auto opts = x.options().dtype(dtype);
  return {at::zeros({x.size(0), x.size(1)}, opts), at::empty({0, x.size(1)}, weight.options()),
          bias ? at::empty({0}, bias->options()) : at::empty({0}, opts)};
}

int64_t env_knob(const char* name, int64_t fallback, int64_t min_value) {
  const char* env = std::getenv(name);
  if (!env || !*env) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  return (*end == '\0' && v >= min_value) ? int64_t(v) : fallback;
}

at::ScalarType loss_dtype(const at::Tensor& x, const at::Tensor& weight) {
  return (x.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble
                                                                                 : at::kFloat;
}

}  // namespace udat

// The emulation build of the CUDA sources (tests/cuda_emu) links this file for its argument
// checks only: it is loaded beside udat_kernels._C, which defines the schema.
#if !defined(UDAT_CUDA_EMULATION)
TORCH_LIBRARY(udat_kernels, m) {
  m.def(
      "margin_ce_fwd(Tensor x, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "Tensor? sample_weight, Tensor? grl_lambda, bool normalize, float scale, float margin, "
      "float cos_margin, float label_smoothing, int ignore_index, int reduction, "
      "bool straight_through, bool compute_grad) -> (Tensor loss, Tensor lse, Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "margin_ce_bwd(Tensor grad_loss, Tensor x, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor? class_weight, Tensor? sample_weight, Tensor lse, Tensor? grl_lambda, "
      "bool normalize, float scale, float margin, float cos_margin, float label_smoothing, "
      "int ignore_index, int reduction, bool straight_through) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias)");
  // The differentiable loss over the pair margin_ce_{fwd,bwd}[_<impl>] (margin_ce_autograd.cpp).
  m.def(
      "margin_ce(Tensor x, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "Tensor? sample_weight, Tensor? grl_lambda, bool normalize, float scale, float margin, "
      "float cos_margin, float label_smoothing, int ignore_index, int reduction, "
      "bool straight_through, bool grad_in_forward, str impl) -> Tensor loss");
  // The shard mode (docs/design.md, "Shard mode"): one shard's per-row parts of the loss, and
  // its part of the gradient from the combined lse. Not differentiable (Autograd falls through
  // below); udat_kernels.distributed holds the autograd formula.
  m.def(
      "margin_ce_shard_fwd(Tensor x, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor? class_weight, Tensor? sample_weight, int class_offset, int num_classes, "
      "bool normalize, float scale, float margin, float cos_margin, float label_smoothing, "
      "int ignore_index, bool straight_through) -> (Tensor lse, Tensor partial)");
  m.def(
      "margin_ce_shard_bwd(Tensor grad_rows, Tensor x, Tensor weight, Tensor target, "
      "Tensor? bias, Tensor? class_weight, Tensor? sample_weight, Tensor lse, "
      "Tensor? grl_lambda, int class_offset, int num_classes, bool normalize, float scale, "
      "float margin, float cos_margin, float label_smoothing, int ignore_index, "
      "bool straight_through) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(udat_kernels, Autograd, m) {
  m.impl("margin_ce_shard_fwd", torch::CppFunction::makeFallthrough());
  m.impl("margin_ce_shard_bwd", torch::CppFunction::makeFallthrough());
}
#endif  // !UDAT_CUDA_EMULATION
