// Host side of the CUDA backend: the prepared inputs of one op call, the pass to run over them,
// and the two implementations (small C: one fused kernel; large C: GEMM row blocks).
#pragma once

#include <ATen/core/Tensor.h>

#include "../udat_ce.h"
#include "cuda_common.cuh"

namespace udat {
namespace cuda {

// Which classes `weight` holds (docs/design.md, "Shard mode"): [offset, offset + C) of
// num_classes, and whether the rows write the shard's partial q_i rather than the loss. The
// ordinary op is the whole problem.
struct ShardSpec {
  int64_t offset;
  int64_t num_classes;
  bool shard;

  static ShardSpec whole(int64_t C) { return {0, C, false}; }
};

// The inputs of one call, on one device, ready for the kernels: x, weight and target contiguous
// (in their own dtypes), the optional vectors in the accumulation dtype.
struct Problem {
  at::Tensor x;              // (B, D)
  at::Tensor weight;         // (C, D)
  at::Tensor target;         // (B,) int64
  at::Tensor class_weight;   // (num_classes,) acc, or undefined
  at::Tensor sample_weight;  // (B,) acc, or undefined
  at::Tensor bias;           // (C,) acc, or undefined
  at::Tensor wsum;           // () acc: Σ class weights, or undefined (then num_classes)
  at::ScalarType acc;        // float32, or float64 when x or weight is float64
  CeOptions opt;
  int64_t B, C, D;           // C: weight's classes (the shard's in the shard mode)
  ShardSpec shard;
};

// One pass over the rows: the forward (loss and lse, and with want_grad the gradient of the reduced
// loss) or the backward (lse given, gradient for an upstream gradient).
struct Pass {
  bool write_loss = false;  // forward: fill loss and lse
  at::Tensor lse_in;        // backward: (B,) acc, the forward's log-sum-exp
  bool want_grad = false;
  at::Tensor upstream;      // acc, (B,) for reduction none or (1,); undefined: one
  at::Tensor lambda;        // grl_lambda (0-dim), or undefined: no GRL

  // Outputs, allocated by the caller: loss is (B,) for none and () otherwise; grads in the dtypes
  // of x (the shard mode: the loss dtype), weight and bias (grad_b undefined without a bias).
  at::Tensor loss, lse, grad_x, grad_w, grad_b;
};

DType dtype_code(at::ScalarType t);

// Of the current device, cached per device.
int device_sm_count();
int64_t device_smem_optin();  // the most dynamic shared memory a block may opt into

Problem make_problem(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                     const OptTensor& bias, const OptTensor& class_weight,
                     const OptTensor& sample_weight, const CeOptions& opt,
                     const ShardSpec& shard);

// Kernel arguments shared by both implementations.
template <typename A>
RowArgs<A> row_args(const Problem& P);
template <typename A>
GradScale<A> grad_scale(const Problem& P, const Pass& pass, const at::Tensor& divisor_parts);

// Partial sums of the mean's divisor, one per block of rows, for kernels that need the divisor
// before they can form a gradient (their blocks add the partials in order).
at::Tensor divisor_partials(const Problem& P);

// loss = Σ parts (sum) or Σ loss parts / Σ divisor parts (mean; NaN when the divisor is 0).
void reduce_loss(const Problem& P, const at::Tensor& loss_parts, const at::Tensor& divisor_parts,
                 at::Tensor& loss);

// Small C: one fused kernel a pass (plus, for large B, a short reduction of per-block partials).
bool small_c_fits(const Problem& P);
void small_c_run(const Problem& P, Pass& pass);

// Large C: row blocks whose logits fit a memory budget; cuBLAS GEMMs and fused epilogues.
void large_c_run(const Problem& P, Pass& pass);

// The two ops' CUDA kernels (registered for the CUDA dispatch key in margin_ce_cuda.cu).
FwdResult margin_ce_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& target, const OptTensor& bias,
                             const OptTensor& class_weight, const OptTensor& sample_weight,
                             const OptTensor& grl_lambda, bool normalize, double scale,
                             double margin, double cos_margin, double label_smoothing,
                             int64_t ignore_index, int64_t reduction, bool straight_through,
                             bool compute_grad);
BwdResult margin_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& target,
                             const OptTensor& bias, const OptTensor& class_weight,
                             const OptTensor& sample_weight, const at::Tensor& lse,
                             const OptTensor& grl_lambda, bool normalize, double scale,
                             double margin, double cos_margin, double label_smoothing,
                             int64_t ignore_index, int64_t reduction, bool straight_through);

// The shard mode of the pair (docs/design.md, "Shard mode"), on the same passes: the ordinary
// op's kernels with a class offset, per-row partials and the combined lse in the backward.
ShardFwdResult margin_ce_shard_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& target, const OptTensor& bias,
                                        const OptTensor& class_weight,
                                        const OptTensor& sample_weight, int64_t class_offset,
                                        int64_t num_classes, bool normalize, double scale,
                                        double margin, double cos_margin,
                                        double label_smoothing, int64_t ignore_index,
                                        bool straight_through);
BwdResult margin_ce_shard_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                   const at::Tensor& weight, const at::Tensor& target,
                                   const OptTensor& bias, const OptTensor& class_weight,
                                   const OptTensor& sample_weight, const at::Tensor& lse,
                                   const OptTensor& grl_lambda, int64_t class_offset,
                                   int64_t num_classes, bool normalize, double scale,
                                   double margin, double cos_margin, double label_smoothing,
                                   int64_t ignore_index, bool straight_through);

}  // namespace cuda
}  // namespace udat
