// Host side of the small-C path: sizes the grid and launches small_c_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "host_api.h"
#include "margin_ce_cuda.h"
#include "small_c_kernels.cuh"

namespace udat {
namespace cuda {
namespace {

constexpr int64_t kMaxClasses = 8;
constexpr int64_t kMaxFeatures = int64_t(kSmallThreads) * kColsPerThread;  // one column group
// Up to this many rows one block does everything, the reductions included: a single launch a
// pass, which is what CUDA-graph replay of the paper's heads (batch 64) wants.
constexpr int64_t kSingleBlockRows = 128;
constexpr int kFinalizeThreads = 256;

int64_t padded_features(int64_t D) { return (D + 7) / 8 * 8; }

template <int NC>
int64_t smem_bytes_for(at::ScalarType acc, int64_t D) {
  const int64_t d_pad = padded_features(D);
  return acc == at::kDouble ? SmallSmem<double>(NC, small_tile<NC>(), d_pad).bytes
                            : SmallSmem<float>(NC, small_tile<NC>(), d_pad).bytes;
}

int64_t smem_bytes(const Problem& P) {
  return P.C <= 2 ? smem_bytes_for<2>(P.acc, P.D) : smem_bytes_for<8>(P.acc, P.D);
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename S, typename A, int NC>
void launch(const Problem& P, Pass& pass) {
  const int64_t B = P.B, C = P.C, D = P.D;
  const cudaStream_t stream = current_stream();
  const auto acc_opts = P.x.options().dtype(P.acc);
  const bool none = P.opt.reduction == Reduction::None;
  const bool mean = P.opt.reduction == Reduction::Mean;
  auto kernel = small_c_kernel<S, A, NC>;

  const int64_t d_pad = padded_features(D);
  const int64_t smem = SmallSmem<A>(NC, small_tile<NC>(), d_pad).bytes;
  if (smem > 48 * 1024) {
    UDAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  }
  const bool single = B <= kSingleBlockRows;
  int grid = 1;
  if (!single) {
    int per_sm = 0;
    UDAT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &per_sm, kernel, kSmallThreads, static_cast<size_t>(smem)));
    const int64_t tiles = (B + small_tile<NC>() - 1) / small_tile<NC>();
    grid = static_cast<int>(
        std::min<int64_t>(tiles, int64_t(std::max(per_sm, 1)) * device_sm_count()));
  }
  const int per_group = static_cast<int>((D + kColsPerThread - 1) / kColsPerThread);
  const int groups = per_group > 0 ? kSmallThreads / per_group : 1;

  // One workspace for every partial: grad ŵ per (block, row group), per-class sums, loss, divisor.
  const int64_t n_gw = pass.want_grad ? int64_t(grid) * groups * C * D : 0;
  const int64_t n_cls = int64_t(grid) * NC;
  // (Separate buffers: the emulation checks the bounds of each.)
  at::Tensor gw_parts = at::empty({n_gw}, acc_opts);
  at::Tensor cls_parts = at::empty({n_cls}, acc_opts);
  at::Tensor loss_parts = at::empty({grid}, acc_opts);
  at::Tensor red_parts = at::empty({grid}, acc_opts);
  at::Tensor div_parts;
  if (pass.want_grad && mean && !single) div_parts = divisor_partials(P);

  SmallArgs<S, A> a{};
  a.x = dev_ptr<const S>(P.x, "x");
  a.w = dev_ptr<const void>(P.weight, "weight");
  a.w_dtype = dtype_code(P.weight.scalar_type());
  a.row = row_args<A>(P);
  a.gs = grad_scale<A>(P, pass, div_parts);
  a.lse_in = pass.lse_in.defined() ? dev_ptr<const A>(pass.lse_in, "lse") : nullptr;
  a.lse_out = pass.write_loss ? dev_ptr<A>(pass.lse, "lse") : nullptr;
  a.loss_rows = pass.write_loss && none ? dev_ptr<A>(pass.loss, "loss") : nullptr;
  a.write_loss = pass.write_loss;
  a.want_grad = pass.want_grad;
  a.grad_x = pass.want_grad ? dev_ptr<S>(pass.grad_x, "grad_x") : nullptr;
  a.gw_parts = dev_ptr<A>(gw_parts, "grad W partials");
  a.cls_parts = dev_ptr<A>(cls_parts, "class partials");
  a.loss_parts = dev_ptr<A>(loss_parts, "loss partials");
  a.div_parts = dev_ptr<A>(red_parts, "divisor partials");
  a.finalize = single;
  if (pass.want_grad) {
    a.grad_w = dev_ptr<void>(pass.grad_w, "grad_weight");
    a.gw_dtype = dtype_code(pass.grad_w.scalar_type());
    if (pass.grad_b.defined()) {
      a.grad_b = dev_ptr<void>(pass.grad_b, "grad_bias");
      a.gb_dtype = dtype_code(pass.grad_b.scalar_type());
    }
  }
  a.loss_out = pass.write_loss && !none ? dev_ptr<A>(pass.loss, "loss") : nullptr;
  a.groups = groups;
  a.d_pad = d_pad;
  a.vec16 = D % (16 / int64_t(sizeof(S))) == 0 && aligned(a.x, 16);
  a.vec4 = D % kColsPerThread == 0 && aligned(a.x, kColsPerThread * sizeof(S)) &&
           (!pass.want_grad || aligned(a.grad_x, kColsPerThread * sizeof(S)));
  UDAT_LAUNCH(kernel, grid, kSmallThreads, smem, stream)(a);
  UDAT_KERNEL_LAUNCH_CHECK();
  if (single) return;

  if (pass.want_grad) {
    SmallFinalizeArgs<A> f{};
    f.w = a.w;
    f.w_dtype = a.w_dtype;
    f.gw_parts = a.gw_parts;
    f.n_parts = grid * groups;
    f.cls_parts = a.cls_parts;
    f.n_blocks = grid;
    f.nc = NC;
    f.C = C;
    f.D = D;
    f.normalize = P.opt.normalize;
    f.grad_w = a.grad_w;
    f.gw_dtype = a.gw_dtype;
    f.grad_b = a.grad_b;
    f.gb_dtype = a.gb_dtype;
    const dim3 fgrid(static_cast<unsigned>(std::max<int64_t>(1, (D + kFinalizeThreads - 1) /
                                                                    kFinalizeThreads)),
                     static_cast<unsigned>(C));
    UDAT_LAUNCH(small_c_finalize_kernel<A>, fgrid, kFinalizeThreads, 0, stream)(f);
    UDAT_KERNEL_LAUNCH_CHECK();
  }
  if (pass.write_loss && !none) {
    reduce_loss(P, loss_parts, red_parts, pass.loss);
  }
}

template <typename S, typename A>
void launch_nc(const Problem& P, Pass& pass) {
  if (P.C <= 2) {
    launch<S, A, 2>(P, pass);
  } else {
    launch<S, A, 8>(P, pass);
  }
}

}  // namespace

bool small_c_fits(const Problem& P) {
  return P.C <= kMaxClasses && P.D <= kMaxFeatures && smem_bytes(P) <= device_smem_optin();
}

void small_c_run(const Problem& P, Pass& pass) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.x.scalar_type(), "small_c", [&] {
    using S = scalar_t;
    if constexpr (std::is_same_v<S, double>) {
      launch_nc<S, double>(P, pass);
    } else if (P.acc == at::kDouble) {
      launch_nc<S, double>(P, pass);
    } else {
      launch_nc<S, float>(P, pass);
    }
  });
}

}  // namespace cuda
}  // namespace udat
