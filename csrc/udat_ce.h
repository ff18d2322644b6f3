// The fused cross-entropy op: options, the argument checks every backend shares, and the
// per-device entry points. The schema itself is declared once, in udat_ce.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "margin_math.h"

namespace udat {

using OptTensor = c10::optional<at::Tensor>;

// The scalar arguments of both ops, as the schema gives them.
struct CeOptions {
  bool normalize;          // angular head (cosine logits) or linear head (x·Wᵀ + b)
  double scale;            // s (angular only)
  double margin;           // m2, radians (angular only)
  double cos_margin;       // m3 (angular only)
  double label_smoothing;  // ε
  int64_t ignore_index;
  Reduction reduction;
  bool straight_through;   // ψ' = 1
};

CeOptions make_options(bool normalize, double scale, double margin, double cos_margin,
                       double label_smoothing, int64_t ignore_index, int64_t reduction,
                       bool straight_through);

// Shapes, dtypes and devices of the tensor arguments, and the ranges of the scalar ones. Every
// failure raises a ValueError/TypeError (c10) whose message names the argument.
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                  const OptTensor& bias, const OptTensor& class_weight,
                  const OptTensor& sample_weight, const CeOptions& opt);

// The shard mode (docs/math.md, "Class shards"; docs/design.md, "Shard mode"): `weight` holds
// the classes [class_offset, class_offset + C_l) of num_classes; C_l may be 0. The same checks
// as check_inputs, except that weight may be empty, bias is (C_l,) and class_weight is the whole
// (num_classes,) vector; and 0 <= class_offset, class_offset + C_l <= num_classes, num_classes
// >= 1. Targets are not range-checked: a row whose target is outside [0, num_classes) and not
// ignore_index gets NaN outputs.
void check_shard_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                        const OptTensor& bias, const OptTensor& class_weight,
                        const OptTensor& sample_weight, const CeOptions& opt,
                        int64_t class_offset, int64_t num_classes);

// The per-row inputs of the shard backward: grad_rows and lse, both floating point, (B,), on
// x's device.
void check_shard_rows(const at::Tensor& x, const at::Tensor& grad_rows, const at::Tensor& lse);

// float64 when x or weight is float64, float32 otherwise: the dtype of loss and lse.
at::ScalarType loss_dtype(const at::Tensor& x, const at::Tensor& weight);

// An integer tuning knob from the environment (tests use them to force a path on small inputs):
// the variable's value when it is set to an integer >= min_value, `fallback` otherwise.
int64_t env_knob(const char* name, int64_t fallback, int64_t min_value = 1);

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using ShardFwdResult = std::tuple<at::Tensor, at::Tensor>;  // (lse_local, partial)

// A shard without classes, on any device (tensor ops, no host sync): the forward's lse = −inf and
// q = 0 (NaN on rows whose target is outside [0, num_classes) and not ignore_index); the
// backward's grad x = 0 and empty grad W and grad bias. `dtype`: the loss dtype.
ShardFwdResult empty_shard_forward(const at::Tensor& x, const at::Tensor& target,
                                   at::ScalarType dtype, int64_t ignore_index,
                                   int64_t num_classes);
BwdResult empty_shard_backward(const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, at::ScalarType dtype);

}  // namespace udat
