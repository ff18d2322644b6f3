// Large C: row blocks whose logits fit a memory budget, cuBLAS GEMMs on the current stream (grad W
// accumulated by the GEMM itself), and the fused epilogue kernels of large_c_kernels.cuh. Never a
// B×C tensor.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "gemm.h"
#include "host_api.h"
#include "large_c_kernels.cuh"
#include "margin_ce_cuda.h"

namespace udat {
namespace cuda {
namespace {

// Extra peak memory of the eager loss per logit (measured: benchmarks/model_params.py).
constexpr double kEagerBytesPerLogit = 25.5;

// Rows of a block, given what a row costs and what the path holds whatever the block size.
// UDAT_CUDA_BLOCK_BYTES sets the budget (tests use it to force several blocks on small inputs);
// otherwise it comes from free device memory: at most half of it, and where the eager loss would
// fit, at most a quarter of eager's extra peak. Where eager would not fit, the rest of what the
// path holds (grad W's accumulator, a (C, D) float32) stays within one logits block once a block
// has 2·D rows: within twice one logits block in all (docs/design.md, "The CUDA model").
int64_t block_rows(const Problem& P, int64_t per_row, int64_t fixed) {
  const int64_t forced = env_knob("UDAT_CUDA_BLOCK_BYTES", 0);
  double budget = double(forced);
  if (forced <= 0) {
    const double free = double(device_free_bytes());
    const double eager = kEagerBytesPerLogit * double(P.B) * double(P.C);
    budget = 0.5 * free;
    if (eager <= free) budget = std::min(budget, 0.25 * eager);
    budget -= double(fixed);
  }
  const double fit = std::floor(budget / double(per_row));
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(P.B, fit > 0 ? int64_t(fit) : 1));
  const int64_t blocks = (P.B + rows - 1) / rows;
  return (P.B + blocks - 1) / blocks;  // blocks of even size: no short last GEMM
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Blocks for n items at `threads` a block (the grid-stride kernels cap it; one block at least).
unsigned grid_for(int64_t n, int threads, int64_t cap = int64_t(1) << 30) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, cap)));
}


template <typename A, typename G>
void run(const Problem& P, Pass& pass) {
  const CeOptions& opt = P.opt;
  const int64_t B = P.B, C = P.C, D = P.D;
  const cudaStream_t stream = current_stream();
  const auto acc_opts = P.x.options().dtype(P.acc);
  const at::ScalarType gemm_t = c10::CppTypeToScalarType<G>::value;
  const bool mean = opt.reduction == Reduction::Mean;

  // Per call: squared row norms (angular) and W as the GEMM operand (a copy only when x and W
  // differ in dtype).
  at::Tensor x_ss, w_ss, w_inv;
  if (opt.normalize) {
    x_ss = at::empty({B}, acc_opts);
    w_ss = at::empty({C}, acc_opts);
    w_inv = at::empty({C}, acc_opts);
    const int rows_per_block = kRowThreads / kWarp;
    UDAT_LAUNCH(row_sumsq_kernel<A>, grid_for(B, rows_per_block), kRowThreads, 0, stream)(
        dev_ptr<const void>(P.x, "x"), dtype_code(P.x.scalar_type()), B, D,
        dev_ptr<A>(x_ss, "x squared norms"), nullptr);
    UDAT_KERNEL_LAUNCH_CHECK();
    UDAT_LAUNCH(row_sumsq_kernel<A>, grid_for(C, rows_per_block), kRowThreads, 0, stream)(
        dev_ptr<const void>(P.weight, "weight"), dtype_code(P.weight.scalar_type()), C, D,
        dev_ptr<A>(w_ss, "weight squared norms"), dev_ptr<A>(w_inv, "weight inverse norms"));
    UDAT_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor w_g = P.weight.to(gemm_t);
  const bool x_direct = P.x.scalar_type() == gemm_t;

  at::Tensor div_parts;
  if (mean) div_parts = divisor_partials(P);
  const RowArgs<A> row = row_args<A>(P);
  const GradScale<A> gs =
      grad_scale<A>(P, pass, pass.want_grad && mean ? div_parts : at::Tensor());

  // Row block size: its logits (and their gradient in the GEMM dtype, and grad x) per row.
  const bool g_separate = gemm_t != P.acc;
  const int64_t per_row =
      C * (int64_t(sizeof(A)) + (g_separate && pass.want_grad ? int64_t(sizeof(G)) : 0)) +
      (pass.want_grad ? D * int64_t(sizeof(A)) : 0);
  // Besides the row block: grad W's accumulator, the gradients themselves, the row vectors.
  const int64_t fixed =
      (pass.want_grad ? C * D * (int64_t(sizeof(A)) + P.weight.element_size()) +
                            B * D * pass.grad_x.element_size()
                      : 0) +
      int64_t(sizeof(A)) * (3 * B + 3 * C);
  const int64_t rows = block_rows(P, per_row, fixed);
  at::Tensor logits = at::empty({rows, C}, acc_opts);
  at::Tensor g_buf, gx_buf, w_acc, b_acc, u;
  if (pass.want_grad) {
    g_buf = g_separate ? at::empty({rows, C}, P.x.options().dtype(gemm_t)) : logits;
    gx_buf = at::empty({rows, D}, acc_opts);
    w_acc = at::empty({C, D}, acc_opts);  // the GEMM's own accumulator: beta 0, then 1
    if (pass.grad_b.defined()) b_acc = at::zeros({C}, acc_opts);
    u = at::empty({B}, acc_opts);
  }
  at::Tensor loss_rows;
  if (pass.write_loss) {
    loss_rows = opt.reduction == Reduction::None ? pass.loss : at::empty({B}, acc_opts);
  }

  for (int64_t r0 = 0; r0 < B; r0 += rows) {
    const int64_t n = std::min(rows, B - r0);
    const at::Tensor xb =
        x_direct ? P.x.narrow(0, r0, n) : P.x.narrow(0, r0, n).to(gemm_t);
    at::Tensor lb = logits.narrow(0, 0, n);
    gemm(xb, false, w_g, true, lb, 0.0);

    EpilogueArgs<A, G> e{};
    e.row = row;
    e.gs = gs;
    e.logits = dev_ptr<const A>(lb, "logits");
    e.g_out = pass.want_grad ? dev_ptr<G>(g_buf.narrow(0, 0, n), "logit gradient") : nullptr;
    e.x_ss = opt.normalize ? dev_ptr<const A>(x_ss, "x squared norms") : nullptr;
    e.w_inv = opt.normalize ? dev_ptr<const A>(w_inv, "weight inverse norms") : nullptr;
    e.r0 = r0;
    e.lse_in = pass.lse_in.defined() ? dev_ptr<const A>(pass.lse_in, "lse") : nullptr;
    e.lse_out = pass.write_loss ? dev_ptr<A>(pass.lse, "lse") : nullptr;
    e.loss_rows = pass.write_loss ? dev_ptr<A>(loss_rows, "row losses") : nullptr;
    e.want_grad = pass.want_grad;
    e.u_out = pass.want_grad ? dev_ptr<A>(u, "u") : nullptr;
    constexpr int64_t V = 4;  // float32 logits only (the kernel reads float64 one by one)
    e.vec = sizeof(A) == 4 && C % V == 0 && aligned(e.logits, 16) &&
            (!pass.want_grad || aligned(e.g_out, V * int64_t(sizeof(G))));
    auto epilogue = epilogue_kernel<A, G>;
    UDAT_LAUNCH(epilogue, static_cast<unsigned>(n), kEpilogueThreads, 0, stream)(e);
    UDAT_KERNEL_LAUNCH_CHECK();
    if (!pass.want_grad) continue;

    const at::Tensor gb = g_buf.narrow(0, 0, n);
    at::Tensor gx = gx_buf.narrow(0, 0, n);
    gemm(gb, false, w_g, false, gx, 0.0);
    UDAT_LAUNCH(finish_grad_x_kernel<A>, grid_for(n * D, 256, 1 << 16), 256, 0, stream)(
        dev_ptr<const A>(gx, "grad x block"), dev_ptr<const void>(P.x, "x"),
        dtype_code(P.x.scalar_type()), dev_ptr<const A>(u, "u"), r0, n, D, opt.normalize, gs,
        dev_ptr<void>(pass.grad_x, "grad_x"), dtype_code(pass.grad_x.scalar_type()));
    UDAT_KERNEL_LAUNCH_CHECK();
    gemm(gb, true, xb, false, w_acc, r0 == 0 ? 0.0 : 1.0);
    if (b_acc.defined()) b_acc.add_(at::sum(gb, {0}, false, P.acc));
  }

  if (pass.write_loss && opt.reduction != Reduction::None) {
    reduce_loss(P, loss_rows, div_parts, pass.loss);
  }
  if (pass.want_grad) {
    UDAT_LAUNCH(finish_grad_w_kernel<A>, static_cast<unsigned>(C), kRowThreads, 0, stream)(
        dev_ptr<const A>(w_acc, "grad W accumulator"), dev_ptr<const void>(P.weight, "weight"),
        dtype_code(P.weight.scalar_type()),
        opt.normalize ? dev_ptr<const A>(w_ss, "weight squared norms") : nullptr, D,
        opt.normalize, dev_ptr<void>(pass.grad_w, "grad_weight"),
        dtype_code(pass.grad_w.scalar_type()));
    UDAT_KERNEL_LAUNCH_CHECK();
    if (b_acc.defined()) pass.grad_b.copy_(b_acc);
  }
}

}  // namespace

void large_c_run(const Problem& P, Pass& pass) {
  const at::ScalarType gemm_t = at::promote_types(P.x.scalar_type(), P.weight.scalar_type());
  if (P.acc == at::kDouble) {
    run<double, double>(P, pass);
  } else if (gemm_t == at::kBFloat16) {
    run<float, c10::BFloat16>(P, pass);
  } else {
    // float16 takes fp32 GEMMs: its range is too narrow for the logit gradient, whose many small
    // entries (p_ij / B over 10^5 classes) would flush to zero yet add up to a sizeable part.
    run<float, float>(P, pass);
  }
}

}  // namespace cuda
}  // namespace udat
