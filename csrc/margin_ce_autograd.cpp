// The differentiable loss op `margin_ce` and its autograd formula, once for every backend.
//
// `margin_ce` returns the loss of a (forward, backward) op pair with the schema of
// `margin_ce_fwd` / `margin_ce_bwd`: the compiled pair (impl "") or another one registered under
// the same names plus "_<impl>" (the Triton pair: impl "triton"). Two ways to the gradient
// (docs/design.md): with grad_in_forward the forward op forms grad x, grad W (and grad b) for an
// upstream gradient of one and the backward only rescales them; otherwise the backward op
// recomputes them from the saved inputs and lse.
//
// The formula is a C++ autograd Function so that an eager training step pays no Python autograd
// overhead: for heads of a few classes that overhead was most of the step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <unordered_map>

#include "udat_ce.h"

namespace udat {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = FwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         bool, double, double, double, double, int64_t, int64_t, bool, bool);
using BwdSig = BwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const at::Tensor&, const OptTensor&, bool, double, double, double, double,
                         int64_t, int64_t, bool);

struct OpPair {
  c10::TypedOperatorHandle<FwdSig> fwd;
  c10::TypedOperatorHandle<BwdSig> bwd;
};

// The op pair an impl names, looked up once (the Triton pair is registered from Python, after
// this library loads). An unknown impl raises, naming it.
const OpPair& op_pair(const std::string& impl) {
  static std::mutex mutex;
  static std::unordered_map<std::string, OpPair> pairs;  // node-based: references stay valid
  std::lock_guard<std::mutex> lock(mutex);
  auto it = pairs.find(impl);
  if (it != pairs.end()) return it->second;
  const std::string suffix = impl.empty() ? "" : "_" + impl;
  auto& dispatcher = c10::Dispatcher::singleton();
  auto fwd = dispatcher.findSchema({"udat_kernels::margin_ce_fwd" + suffix, ""});
  auto bwd = dispatcher.findSchema({"udat_kernels::margin_ce_bwd" + suffix, ""});
  TORCH_CHECK_VALUE(fwd.has_value() && bwd.has_value(), "impl: no op pair udat_kernels::margin_ce_",
                    "{fwd,bwd}", suffix, " is registered (got impl '", impl, "')");
  OpPair pair{fwd->typed<FwdSig>(), bwd->typed<BwdSig>()};
  return pairs.emplace(impl, pair).first->second;
}

// The scalar arguments both ops take, in schema order.
struct Scalars {
  bool normalize;
  double scale, margin, cos_margin, label_smoothing;
  int64_t ignore_index, reduction;
  bool straight_through;
};

constexpr const char* kDoubleBackward =
    "udat_kernels: double backward through the fused cross-entropy is not supported (its "
    "gradient is computed in closed form)";

// Gradients that raise a clear error if anyone differentiates them again (create_graph=True).
variable_list once_differentiable(variable_list grads) {
  variable_list inputs;
  std::vector<size_t> slots;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    slots.push_back(i);
    inputs.push_back(grads[i].detach().requires_grad_(true));
  }
  if (slots.empty()) return grads;
  auto error = std::make_shared<torch::autograd::DelayedError>(kDoubleBackward,
                                                               int64_t(inputs.size()));
  variable_list outs = error->apply(std::move(inputs));
  for (size_t k = 0; k < slots.size(); ++k) grads[slots[k]] = outs[k];
  return grads;
}

// True when t is a plain CPU tensor whose value is one, read outside any tracing, functional or
// transform layer (fake and functional tensors, modes, vmap/grad), where reading a value would
// bake it into a graph or fail. Then the saved gradients are the gradient itself.
bool plain_cpu_one(const at::Tensor& t) {
  using c10::DispatchKey;
  static const c10::DispatchKeySet layers({DispatchKey::Python, DispatchKey::PythonTLSSnapshot,
                                           DispatchKey::Functionalize,
                                           DispatchKey::FuncTorchBatched,
                                           DispatchKey::FuncTorchGradWrapper,
                                           DispatchKey::FuncTorchDynamicLayerFrontMode});
  if (t.numel() != 1 || !t.device().is_cpu() || t.layout() != at::kStrided) return false;
  if (t.key_set().has_any(layers)) return false;
  if (c10::impl::tls_local_dispatch_key_set().included_.has_any(layers)) return false;
  return t.item<double>() == 1.0;
}

class MarginCeFunction : public torch::autograd::Function<MarginCeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& target, const OptTensor& bias,
                            const OptTensor& class_weight, const OptTensor& sample_weight,
                            const OptTensor& grl_lambda, const Scalars& a, bool compute_grad,
                            const std::string& impl) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse, grad_x, grad_w, grad_b] = op_pair(impl).fwd.call(
        x, weight, target, bias, class_weight, sample_weight, grl_lambda, a.normalize, a.scale,
        a.margin, a.cos_margin, a.label_smoothing, a.ignore_index, a.reduction,
        a.straight_through, compute_grad);
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["has_bias"] = bias.has_value();
    if (compute_grad) {
      ctx->save_for_backward({grad_x, grad_w, grad_b});
    } else {
      ctx->saved_data["impl"] = impl;
      ctx->saved_data["normalize"] = a.normalize;
      ctx->saved_data["scale"] = a.scale;
      ctx->saved_data["margin"] = a.margin;
      ctx->saved_data["cos_margin"] = a.cos_margin;
      ctx->saved_data["label_smoothing"] = a.label_smoothing;
      ctx->saved_data["ignore_index"] = a.ignore_index;
      ctx->saved_data["reduction"] = a.reduction;
      ctx->saved_data["straight_through"] = a.straight_through;
      const at::Tensor none;
      ctx->save_for_backward({x, weight, target, bias.value_or(none),
                              class_weight.value_or(none), sample_weight.value_or(none), lse,
                              grl_lambda.value_or(none)});
    }
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_loss = grad_outputs[0];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    variable_list saved = ctx->get_saved_variables();
    at::Tensor grad_x, grad_w, grad_b;
    if (ctx->saved_data["compute_grad"].toBool()) {
      // Formed in the forward for an upstream gradient of one. Any other upstream rescales them
      // into new tensors, leaving the saved ones as they are (retain_graph stays correct). An
      // upstream of one (loss.backward()) returns them as they are: autograd only accumulates in
      // place into, or takes over as .grad, a gradient that nothing else holds, i.e. once the
      // graph (and with it the saved copy) is freed.
      if (plain_cpu_one(grad_loss)) {
        grad_x = saved[0];
        grad_w = saved[1];
        if (has_bias) grad_b = saved[2];
      } else {
        grad_x = saved[0] * grad_loss.to(saved[0].scalar_type());
        grad_w = saved[1] * grad_loss.to(saved[1].scalar_type());
        if (has_bias) grad_b = saved[2] * grad_loss.to(saved[2].scalar_type());
      }
    } else {
      auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
      auto& d = ctx->saved_data;
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(grad_x, grad_w, grad_b) = op_pair(d["impl"].toStringRef()).bwd.call(
          grad_loss, saved[0], saved[1], saved[2], opt(saved[3]), opt(saved[4]), opt(saved[5]),
          saved[6], opt(saved[7]), d["normalize"].toBool(), d["scale"].toDouble(),
          d["margin"].toDouble(), d["cos_margin"].toDouble(), d["label_smoothing"].toDouble(),
          d["ignore_index"].toInt(), d["reduction"].toInt(), d["straight_through"].toBool());
      if (!has_bias) grad_b = at::Tensor();
    }
    // One entry per argument of forward: x, weight, target, bias, class_weight, sample_weight,
    // grl_lambda, the scalars, compute_grad, impl.
    variable_list grads{grad_x, grad_w, at::Tensor(), grad_b, at::Tensor(), at::Tensor(),
                        at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    return at::GradMode::is_enabled() ? once_differentiable(std::move(grads)) : grads;
  }
};

bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

at::Tensor margin_ce_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& target, const OptTensor& bias,
                              const OptTensor& class_weight, const OptTensor& sample_weight,
                              const OptTensor& grl_lambda, bool normalize, double scale,
                              double margin, double cos_margin, double label_smoothing,
                              int64_t ignore_index, int64_t reduction, bool straight_through,
                              bool grad_in_forward, c10::string_view impl) {
  const Scalars a{normalize, scale, margin, cos_margin, label_smoothing, ignore_index, reduction,
                  straight_through};
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || weight.requires_grad() || requires_grad(bias));
  // Per-row losses take any upstream gradient, so their gradient waits for it.
  const bool compute_grad = needs_grad && grad_in_forward && reduction != 0;
  return MarginCeFunction::apply(x, weight, target, bias, class_weight, sample_weight,
                                 grl_lambda, a, compute_grad, std::string(impl));
}

// Below autograd (no_grad tensors under inference mode, tracing): the loss alone.
at::Tensor margin_ce_loss_only(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& target, const OptTensor& bias,
                               const OptTensor& class_weight, const OptTensor& sample_weight,
                               const OptTensor& grl_lambda, bool normalize, double scale,
                               double margin, double cos_margin, double label_smoothing,
                               int64_t ignore_index, int64_t reduction, bool straight_through,
                               bool grad_in_forward, c10::string_view impl) {
  return std::get<0>(op_pair(std::string(impl))
                         .fwd.call(x, weight, target, bias, class_weight, sample_weight,
                                   grl_lambda, normalize, scale, margin, cos_margin,
                                   label_smoothing, ignore_index, reduction, straight_through,
                                   false));
}

}  // namespace
}  // namespace udat

TORCH_LIBRARY_IMPL(udat_kernels, Autograd, m) {
  m.impl("margin_ce", &udat::margin_ce_autograd);
  // The pair itself is not differentiable (its outputs include the gradients): margin_ce is.
  m.impl("margin_ce_fwd", torch::CppFunction::makeFallthrough());
  m.impl("margin_ce_bwd", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(udat_kernels, CompositeExplicitAutograd, m) {
  m.impl("margin_ce", &udat::margin_ce_loss_only);
}
