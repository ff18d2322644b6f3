// Host side of the small-C path: sizes the grid and the tree of partials, and launches
// small_c_kernels.cuh: one launch a pass (plus, for the mean's gradient of a large batch, a
// short pass over the targets for the divisor).
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
// A small batch is spread over blocks of this many rows (at least), so that the paper's batch of
// 64 runs on eight SMs instead of one (docs/design.md, "The CUDA model").
constexpr int kSmallBatchTileRows = 8;
// Partials a node of the backward's tree adds: two levels up to 256 blocks, three beyond. The
// forward's partials are two numbers: one level.
constexpr int kBackwardFanIn = 16;
// Up to this batch every block of a mean's backward sums the divisor itself; beyond it a short
// kernel does, once.
constexpr int64_t kDivisorInBlockRows = 4096;

int64_t padded_features(int64_t D) { return (D + 7) / 8 * 8; }

template <typename A, typename WS, int NC>
int64_t smem_bytes_of(int64_t D) {
  using T = SmallTraits<A, NC>;
  return SmallSmem(NC, sizeof(WS), sizeof(A), T::kTile, T::COLS, padded_features(D)).bytes;
}

// The most shared memory any storage choice needs (W as x's dtype or as the accumulation type).
template <int NC>
int64_t smem_bytes(at::ScalarType acc, int64_t D) {
  return acc == at::kDouble ? smem_bytes_of<double, double, NC>(D)
                            : smem_bytes_of<float, float, NC>(D);
}

template <int NC>
int64_t max_features(at::ScalarType acc) {
  return acc == at::kDouble ? SmallTraits<double, NC>::kMaxFeatures
                            : SmallTraits<float, NC>::kMaxFeatures;
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename S, typename A, typename WS, int NC>
void launch(const Problem& P, Pass& pass) {
  using T = SmallTraits<A, NC>;
  const int64_t B = P.B, C = P.C, D = P.D;
  const cudaStream_t stream = current_stream();
  const auto acc_opts = P.x.options().dtype(P.acc);
  const bool none = P.opt.reduction == Reduction::None;
  const bool mean = P.opt.reduction == Reduction::Mean;
  auto kernel = small_c_kernel<S, A, WS, NC>;

  const int64_t d_pad = padded_features(D);
  const int64_t smem = smem_bytes_of<A, WS, NC>(D);
  if (smem > 48 * 1024) {
    UDAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  }
  int per_sm = 0;
  UDAT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, kernel, kSmallThreads, static_cast<size_t>(smem)));
  const int64_t max_blocks = int64_t(std::max(per_sm, 1)) * device_sm_count();
  // Full tiles where the batch fills the machine with them; smaller ones (never under
  // kSmallBatchTileRows rows) that spread a small batch over more blocks.
  auto round_up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
  const int64_t spread = round_up(std::max<int64_t>(kSmallBatchTileRows,
                                                    (B + max_blocks - 1) / max_blocks),
                                  T::R);
  const int tile_rows = static_cast<int>(std::min<int64_t>(T::kTile, spread));
  // Blocks take even shares of the batch (whole tiles but for the last of each share).
  const int64_t shares = std::min<int64_t>((B + tile_rows - 1) / tile_rows, max_blocks);
  const int64_t block_rows = (B + shares - 1) / shares;
  const int grid = static_cast<int>((B + block_rows - 1) / block_rows);
  const int per_group = static_cast<int>((D + T::COLS - 1) / T::COLS);
  const int groups = per_group > 0 ? kSmallThreads / per_group : 1;

  SmallArgs<S, A> a{};
  // The tree of partials: a node per block, then a node per fan_in nodes, up to one.
  a.fan_in = pass.want_grad ? kBackwardFanIn : std::max(2, grid);
  int64_t nodes = 0;
  for (int64_t n = grid;; n = (n + a.fan_in - 1) / a.fan_in) {
    TORCH_CHECK(a.levels < kMaxTreeLevels, "small_c: too many blocks for the tree");
    a.node_offset[a.levels] = nodes;
    a.level_nodes[a.levels] = static_cast<int>(n);
    ++a.levels;
    nodes += n;
    if (n == 1) break;
  }
  // (Separate buffers: the emulation checks the bounds of each.)
  at::Tensor gw_parts = at::empty({pass.want_grad ? nodes * C * D : 0}, acc_opts);
  at::Tensor cls_parts = at::empty({nodes * NC}, acc_opts);
  at::Tensor red_parts = at::empty({nodes * 2}, acc_opts);
  at::Tensor div_parts;
  if (pass.want_grad && mean && B > kDivisorInBlockRows) div_parts = divisor_partials(P);

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
  a.tile_rows = tile_rows;
  a.block_rows = block_rows;
  a.groups = groups;
  a.d_pad = d_pad;
  a.vec16 = D % (16 / int64_t(sizeof(S))) == 0 && aligned(a.x, 16);
  a.vec_cols = D % T::COLS == 0 && aligned(a.x, T::COLS * sizeof(S)) &&
               (!pass.want_grad || aligned(a.grad_x, T::COLS * sizeof(S)));
  a.gw_parts = pass.want_grad ? dev_ptr<A>(gw_parts, "grad W partials") : nullptr;
  a.cls_parts = dev_ptr<A>(cls_parts, "class partials");
  a.red_parts = dev_ptr<A>(red_parts, "loss and divisor partials");
  a.counters = nodes > grid ? counter_slots(nodes - grid) : nullptr;
  if (pass.want_grad) {
    a.grad_w = dev_ptr<void>(pass.grad_w, "grad_weight");
    a.gw_dtype = dtype_code(pass.grad_w.scalar_type());
    if (pass.grad_b.defined()) {
      a.grad_b = dev_ptr<void>(pass.grad_b, "grad_bias");
      a.gb_dtype = dtype_code(pass.grad_b.scalar_type());
    }
  }
  a.loss_out = pass.write_loss && !none ? dev_ptr<A>(pass.loss, "loss") : nullptr;
  UDAT_LAUNCH(kernel, grid, kSmallThreads, smem, stream)(a);
  UDAT_KERNEL_LAUNCH_CHECK();
}

// W is kept in shared memory in x's dtype when it has it (no copy, no rounding), else in the
// accumulation type.
template <typename S, typename A, int NC>
void launch_ws(const Problem& P, Pass& pass) {
  // A 16-bit x with a float accumulator is the only case where W can be stored narrower.
  if constexpr (std::is_same_v<A, float> && sizeof(S) == 2) {
    if (P.weight.scalar_type() == P.x.scalar_type()) {
      launch<S, A, S, NC>(P, pass);
      return;
    }
  }
  launch<S, A, A, NC>(P, pass);
}

template <typename S, typename A>
void launch_nc(const Problem& P, Pass& pass) {
  if (P.C <= 2) {
    launch_ws<S, A, 2>(P, pass);
  } else {
    launch_ws<S, A, 8>(P, pass);
  }
}

}  // namespace

bool small_c_fits(const Problem& P) {
  if (P.C > kMaxClasses) return false;
  const bool two = P.C <= 2;
  const int64_t max_d = two ? max_features<2>(P.acc) : max_features<8>(P.acc);
  const int64_t smem = two ? smem_bytes<2>(P.acc, P.D) : smem_bytes<8>(P.acc, P.D);
  return P.D <= max_d && smem <= device_smem_optin();
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
