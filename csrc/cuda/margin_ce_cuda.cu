// The CUDA implementation of udat_kernels::margin_ce_fwd / margin_ce_bwd and of their shard mode
// margin_ce_shard_fwd / margin_ce_shard_bwd: argument preparation, the row reductions both paths
// share, the choice of path, and the registration.
//
// Everything is launched on the current stream and nothing waits for the device: targets are
// not range-checked here (that needs a sync; the Python layer does it when validate=True), and a
// bad target gives its row a NaN loss without ever being used as an index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#if !defined(UDAT_CUDA_EMULATION)
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/library.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "host_api.h"
#include "margin_ce_cuda.h"

namespace udat {
namespace cuda {

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK_TYPE(false, "expected a floating-point tensor, got ", t);
  }
  return DType::F32;
}

namespace {

constexpr int kMaxDevices = 64;
constexpr int kReduceThreads = 512;
constexpr int64_t kDivisorMaxParts = 256;
constexpr int64_t kDivisorRowsPerPart = 2048;

// A device attribute of the current device, read once per device (the emulated device's change
// between tests: read every time).
int cached_attribute(std::atomic<int>* cache, cudaDeviceAttr attr) {
  int dev = 0;
  UDAT_CUDA_CHECK(cudaGetDevice(&dev));
#if defined(UDAT_CUDA_EMULATION)
  cache = nullptr;
#endif
  if (cache && dev < kMaxDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  UDAT_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
  if (cache && dev < kMaxDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

std::atomic<int> g_sm_count[kMaxDevices];
std::atomic<int> g_smem_optin[kMaxDevices];

#if !defined(UDAT_CUDA_EMULATION)
// Counters of the last-block-done trees: one zeroed allocation per device, never freed. A kernel
// leaves its counters zeroed (atomicInc wraps), so the launches of one stream, which run one after
// the other, share a range; a launch captured into a CUDA graph gets a range of its own, so that
// the graph may replay on any stream.
constexpr int64_t kCounterPool = int64_t(1) << 20;
constexpr int64_t kCountersPerLaunch = 4096;
struct CounterPool {
  unsigned* base = nullptr;
  int64_t next = 0;
  std::unordered_map<cudaStream_t, int64_t> by_stream;
};
std::mutex g_counter_mutex;
CounterPool g_counter_pools[kMaxDevices];
#endif

template <typename A>
__global__ void divisor_parts_kernel(const RowArgs<A> r, int64_t chunk, A* out) {
  UDAT_SHARED(A, scratch, kWarp);
  const int64_t lo = int64_t(blockIdx.x) * chunk;
  const int64_t hi = r.B < lo + chunk ? r.B : lo + chunk;
  A s = A(0);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) s += row_divisor(r, i);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

template <typename A>
__global__ void reduce_loss_kernel(const A* loss_parts, int64_t n_loss, const A* div_parts,
                                   int64_t n_div, int reduction, A* out) {
  UDAT_SHARED(A, scratch, kWarp);
  A total = A(0), div = A(0);
  for (int64_t p = threadIdx.x; p < n_loss; p += blockDim.x) total += loss_parts[p];
  total = block_sum(total, scratch);
  if (div_parts) {
    for (int64_t p = threadIdx.x; p < n_div; p += blockDim.x) div += div_parts[p];
    div = block_sum(div, scratch);
  }
  if (threadIdx.x == 0) {
    out[0] = reduction == static_cast<int>(Reduction::Mean)
                 ? (div != A(0) ? total / div : A(NAN))
                 : total;
  }
}

}  // namespace

int device_sm_count() { return cached_attribute(g_sm_count, cudaDevAttrMultiProcessorCount); }

#if !defined(UDAT_CUDA_EMULATION)
int64_t device_free_bytes() {
  size_t free_bytes = 0, total_bytes = 0;
  UDAT_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  int dev = 0;
  UDAT_CUDA_CHECK(cudaGetDevice(&dev));
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev);
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  const int64_t cached = stats.reserved_bytes[all].current - stats.allocated_bytes[all].current;
  return int64_t(free_bytes) + std::max<int64_t>(0, cached);
}

unsigned* counter_slots(int64_t n) {
  TORCH_CHECK(n <= kCountersPerLaunch, "counter_slots: ", n, " counters asked for, at most ",
              kCountersPerLaunch);
  int dev = 0;
  UDAT_CUDA_CHECK(cudaGetDevice(&dev));
  TORCH_CHECK(dev < kMaxDevices, "counter_slots: device ", dev, " beyond ", kMaxDevices);
  const cudaStream_t stream = current_stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  UDAT_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const std::lock_guard<std::mutex> lock(g_counter_mutex);
  CounterPool& pool = g_counter_pools[dev];
  if (!pool.base) {
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "udat_kernels: the first fused loss on a device cannot run inside CUDA-graph "
                "capture; run it once before capturing (the usual warm-up)");
    UDAT_CUDA_CHECK(cudaMalloc(&pool.base, kCounterPool * sizeof(unsigned)));
    UDAT_CUDA_CHECK(cudaMemset(pool.base, 0, kCounterPool * sizeof(unsigned)));
    UDAT_CUDA_CHECK(cudaDeviceSynchronize());  // once per device and process
  }
  auto take = [&]() {
    TORCH_CHECK(pool.next + kCountersPerLaunch <= kCounterPool,
                "udat_kernels: out of last-block counters (too many captured graphs)");
    const int64_t at = pool.next;
    pool.next += kCountersPerLaunch;
    return at;
  };
  if (capture != cudaStreamCaptureStatusNone) return pool.base + take();
  auto it = pool.by_stream.find(stream);
  if (it == pool.by_stream.end()) it = pool.by_stream.emplace(stream, take()).first;
  return pool.base + it->second;
}
#endif

int64_t device_smem_optin() {
  return cached_attribute(g_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

Problem make_problem(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& target,
                     const OptTensor& bias, const OptTensor& class_weight,
                     const OptTensor& sample_weight, const CeOptions& opt,
                     const ShardSpec& shard) {
  Problem P;
  P.acc = loss_dtype(x, weight);
  P.opt = opt;
  P.shard = shard;
  P.x = x.contiguous();
  P.weight = weight.contiguous();
  P.target = target.contiguous();
  P.B = x.size(0);
  P.C = weight.size(0);
  P.D = x.size(1);
  if (class_weight) {
    P.class_weight = class_weight->to(P.acc).contiguous();
    // Σ_j w_j only matters with label smoothing; summed on the device, never read on the host.
    if (opt.label_smoothing != 0) P.wsum = P.class_weight.sum();
  }
  if (sample_weight) P.sample_weight = sample_weight->to(P.acc).contiguous();
  if (bias) P.bias = bias->to(P.acc).contiguous();
  return P;
}

template <typename A>
RowArgs<A> row_args(const Problem& P) {
  RowArgs<A> r{};
  r.target = dev_ptr<const int64_t>(P.target, "target");
  r.class_weight = P.class_weight.defined() ? dev_ptr<const A>(P.class_weight, "class_weight")
                                            : nullptr;
  r.sample_weight =
      P.sample_weight.defined() ? dev_ptr<const A>(P.sample_weight, "sample_weight") : nullptr;
  r.bias = P.bias.defined() ? dev_ptr<const A>(P.bias, "bias") : nullptr;
  r.wsum = P.wsum.defined() ? dev_ptr<const A>(P.wsum, "class weight sum") : nullptr;
  r.B = P.B;
  r.C = P.C;
  r.D = P.D;
  r.offset = P.shard.offset;
  r.num_classes = P.shard.num_classes;
  r.shard = P.shard.shard;
  r.ignore_index = P.opt.ignore_index;
  r.smoothing = static_cast<A>(P.opt.label_smoothing);
  r.mp = cast_params<A>(make_margin_params(P.opt.scale, P.opt.margin, P.opt.cos_margin,
                                           P.opt.straight_through));
  r.normalize = P.opt.normalize;
  r.reduction = static_cast<int>(P.opt.reduction);
  return r;
}

template <typename A>
GradScale<A> grad_scale(const Problem& P, const Pass& pass, const at::Tensor& divisor_parts) {
  GradScale<A> g{};
  g.upstream = pass.upstream.defined() ? dev_ptr<const A>(pass.upstream, "grad_loss") : nullptr;
  g.per_row = P.opt.reduction == Reduction::None;
  g.divisor_parts =
      divisor_parts.defined() ? dev_ptr<const A>(divisor_parts, "divisor parts") : nullptr;
  g.n_divisor_parts = divisor_parts.defined() ? static_cast<int>(divisor_parts.numel()) : 0;
  g.x_scale_host = A(1);
  if (pass.lambda.defined()) {
    if (pass.lambda.device() == P.x.device()) {
      g.lambda = dev_ptr<const void>(pass.lambda, "grl_lambda");
      g.lambda_dtype = dtype_code(pass.lambda.scalar_type());
    } else {
      // A host λ: reading it costs no device sync.
      g.x_scale_host = static_cast<A>(-pass.lambda.item<double>());
    }
  }
  return g;
}

template RowArgs<float> row_args<float>(const Problem&);
template RowArgs<double> row_args<double>(const Problem&);
template GradScale<float> grad_scale<float>(const Problem&, const Pass&, const at::Tensor&);
template GradScale<double> grad_scale<double>(const Problem&, const Pass&, const at::Tensor&);

at::Tensor divisor_partials(const Problem& P) {
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(kDivisorMaxParts,
                           (P.B + kDivisorRowsPerPart - 1) / kDivisorRowsPerPart));
  const int64_t chunk = std::max<int64_t>(1, (P.B + parts - 1) / parts);
  at::Tensor out = at::empty({parts}, P.x.options().dtype(P.acc));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(P.acc, "divisor_partials", [&] {
    UDAT_LAUNCH(divisor_parts_kernel<scalar_t>, static_cast<unsigned>(parts), kReduceThreads, 0,
                stream)(row_args<scalar_t>(P), chunk, dev_ptr<scalar_t>(out, "divisor parts"));
  });
  UDAT_KERNEL_LAUNCH_CHECK();
  return out;
}

void reduce_loss(const Problem& P, const at::Tensor& loss_parts, const at::Tensor& divisor_parts,
                 at::Tensor& loss) {
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(P.acc, "reduce_loss", [&] {
    UDAT_LAUNCH(reduce_loss_kernel<scalar_t>, 1, kReduceThreads, 0, stream)(
        dev_ptr<const scalar_t>(loss_parts, "loss parts"), loss_parts.numel(),
        divisor_parts.defined() ? dev_ptr<const scalar_t>(divisor_parts, "divisor parts")
                                : nullptr,
        divisor_parts.defined() ? divisor_parts.numel() : 0,
        static_cast<int>(P.opt.reduction), dev_ptr<scalar_t>(loss, "loss"));
  });
  UDAT_KERNEL_LAUNCH_CHECK();
}

namespace {

// Large-C path on demand (tests use it to cover both paths on small shapes).
bool force_large() {
  const char* env = std::getenv("UDAT_CUDA_FORCE_GEMM");
  return env && env[0] == '1';
}

void run_pass(const Problem& P, Pass& pass) {
  if (P.B == 0) {  // what torch's cross_entropy gives for an empty batch
    if (pass.write_loss && P.opt.reduction != Reduction::None) {
      pass.loss.fill_(P.opt.reduction == Reduction::Mean
                          ? std::numeric_limits<double>::quiet_NaN()
                          : 0.0);
    }
    if (pass.want_grad) {
      pass.grad_w.zero_();
      if (pass.grad_b.defined()) pass.grad_b.zero_();
    }
    return;
  }
  if (!force_large() && small_c_fits(P)) {
    if (pass.want_grad && pass.grad_x.scalar_type() != P.x.scalar_type()) {
      // The fused kernel writes grad x in x's dtype: a grad x in the loss dtype (the shard
      // mode's) takes x widened to it (exactly; a copy of B × D, small beside the pass).
      Problem wide = P;
      wide.x = P.x.to(pass.grad_x.scalar_type());
      small_c_run(wide, pass);
      return;
    }
    small_c_run(P, pass);
  } else {
    large_c_run(P, pass);
  }
}

void set_lambda(const OptTensor& grl_lambda, const at::Tensor& x, Pass& pass) {
  if (!grl_lambda) return;
  TORCH_CHECK_VALUE(grl_lambda->numel() == 1, "grl_lambda: expected a 0-dim tensor, got shape ",
                    grl_lambda->sizes());
  at::Tensor lam = grl_lambda->reshape({});
  // A λ on another GPU or of a dtype the kernels do not read is copied; one on the host is read
  // there (no device sync).
  if (!lam.is_cpu() && (lam.device() != x.device() || !at::isFloatingType(lam.scalar_type()))) {
    lam = lam.to(x.device(), at::kDouble);
  }
  pass.lambda = lam;
}

void alloc_grads(const Problem& P, const OptTensor& bias, Pass& pass) {
  pass.grad_x = at::empty({P.B, P.D}, P.x.options());
  pass.grad_w = at::empty({P.C, P.D}, P.weight.options());
  if (bias) pass.grad_b = at::empty({P.C}, bias->options());
}

}  // namespace

FwdResult margin_ce_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& target, const OptTensor& bias,
                             const OptTensor& class_weight, const OptTensor& sample_weight,
                             const OptTensor& grl_lambda, bool normalize, double scale,
                             double margin, double cos_margin, double label_smoothing,
                             int64_t ignore_index, int64_t reduction, bool straight_through,
                             bool compute_grad) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, reduction, straight_through);
  check_inputs(x, weight, target, bias, class_weight, sample_weight, opt);
  const DeviceGuard guard(x.device());
  const Problem P = make_problem(x, weight, target, bias, class_weight, sample_weight, opt,
                                 ShardSpec::whole(weight.size(0)));
  const auto acc_opts = x.options().dtype(P.acc);
  Pass pass;
  pass.write_loss = true;
  pass.want_grad = compute_grad;
  pass.loss = opt.reduction == Reduction::None ? at::empty({P.B}, acc_opts)
                                               : at::empty({}, acc_opts);
  pass.lse = at::empty({P.B}, acc_opts);
  if (compute_grad) {
    set_lambda(grl_lambda, x, pass);
    alloc_grads(P, bias, pass);
  }
  run_pass(P, pass);
  if (!compute_grad) {
    return {pass.loss, pass.lse, at::empty({0}, x.options()), at::empty({0}, weight.options()),
            at::empty({0}, bias ? bias->options() : acc_opts)};
  }
  at::Tensor gb = bias ? pass.grad_b : at::empty({0}, acc_opts);
  return {pass.loss, pass.lse, pass.grad_x, pass.grad_w, gb};
}

BwdResult margin_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& x,
                             const at::Tensor& weight, const at::Tensor& target,
                             const OptTensor& bias, const OptTensor& class_weight,
                             const OptTensor& sample_weight, const at::Tensor& lse,
                             const OptTensor& grl_lambda, bool normalize, double scale,
                             double margin, double cos_margin, double label_smoothing,
                             int64_t ignore_index, int64_t reduction, bool straight_through) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, reduction, straight_through);
  check_inputs(x, weight, target, bias, class_weight, sample_weight, opt);
  const int64_t B = x.size(0);
  const bool per_row = opt.reduction == Reduction::None;
  TORCH_CHECK_VALUE(per_row ? (grad_loss.dim() == 1 && grad_loss.size(0) == B)
                            : grad_loss.numel() == 1,
                    "grad_loss: expected the shape of the loss, got ", grad_loss.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == x.device(), "grad_loss: expected a tensor on ",
                    x.device(), " like x, got ", grad_loss.device());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == B, "lse: expected shape (", B, ",), got ",
                    lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == x.device(), "lse: expected a tensor on ", x.device(),
                    " like x, got ", lse.device());
  const DeviceGuard guard(x.device());
  const Problem P = make_problem(x, weight, target, bias, class_weight, sample_weight, opt,
                                 ShardSpec::whole(weight.size(0)));
  Pass pass;
  pass.want_grad = true;
  pass.lse_in = lse.to(P.acc).contiguous();
  pass.upstream = grad_loss.to(P.acc).reshape({-1}).contiguous();
  set_lambda(grl_lambda, x, pass);
  alloc_grads(P, bias, pass);
  run_pass(P, pass);
  at::Tensor gb = bias ? pass.grad_b : at::empty({0}, x.options().dtype(P.acc));
  return {pass.grad_x, pass.grad_w, gb};
}

// The shard mode (docs/design.md, "Shard mode"): the same passes over a shard of the classes
// (ShardSpec), reduction none, rows writing q_i; the backward takes the combined lse and the
// per-row upstream ∂L/∂loss_i, and writes grad x in the loss dtype. A shard without classes is
// answered without a launch (and without a host sync).

ShardFwdResult margin_ce_shard_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& target, const OptTensor& bias,
                                        const OptTensor& class_weight,
                                        const OptTensor& sample_weight, int64_t class_offset,
                                        int64_t num_classes, bool normalize, double scale,
                                        double margin, double cos_margin,
                                        double label_smoothing, int64_t ignore_index,
                                        bool straight_through) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, 0, straight_through);
  check_shard_inputs(x, weight, target, bias, class_weight, sample_weight, opt, class_offset,
                     num_classes);
  const DeviceGuard guard(x.device());
  const auto acc_opts = x.options().dtype(loss_dtype(x, weight));
  const int64_t B = x.size(0);
  if (weight.size(0) == 0) {
    return empty_shard_forward(x, target, loss_dtype(x, weight), ignore_index, num_classes);
  }
  const Problem P = make_problem(x, weight, target, bias, class_weight, sample_weight, opt,
                                 ShardSpec{class_offset, num_classes, true});
  Pass pass;
  pass.write_loss = true;
  pass.loss = at::empty({B}, acc_opts);  // q_i
  pass.lse = at::empty({B}, acc_opts);
  run_pass(P, pass);
  return {pass.lse, pass.loss};
}

BwdResult margin_ce_shard_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                   const at::Tensor& weight, const at::Tensor& target,
                                   const OptTensor& bias, const OptTensor& class_weight,
                                   const OptTensor& sample_weight, const at::Tensor& lse,
                                   const OptTensor& grl_lambda, int64_t class_offset,
                                   int64_t num_classes, bool normalize, double scale,
                                   double margin, double cos_margin, double label_smoothing,
                                   int64_t ignore_index, bool straight_through) {
  const CeOptions opt = make_options(normalize, scale, margin, cos_margin, label_smoothing,
                                     ignore_index, 0, straight_through);
  check_shard_inputs(x, weight, target, bias, class_weight, sample_weight, opt, class_offset,
                     num_classes);
  check_shard_rows(x, grad_rows, lse);
  const DeviceGuard guard(x.device());
  const at::ScalarType acc = loss_dtype(x, weight);
  const auto acc_opts = x.options().dtype(acc);
  Pass pass;
  set_lambda(grl_lambda, x, pass);
  if (weight.size(0) == 0) return empty_shard_backward(x, weight, bias, acc);
  const Problem P = make_problem(x, weight, target, bias, class_weight, sample_weight, opt,
                                 ShardSpec{class_offset, num_classes, true});
  pass.want_grad = true;
  pass.lse_in = lse.to(acc).contiguous();
  pass.upstream = grad_rows.to(acc).contiguous();  // per row: reduction none
  pass.grad_x = at::empty({P.B, P.D}, acc_opts);
  pass.grad_w = at::empty({P.C, P.D}, P.weight.options());
  if (bias) pass.grad_b = at::empty({P.C}, bias->options());
  run_pass(P, pass);
  return {pass.grad_x, pass.grad_w, bias ? pass.grad_b : at::empty({0}, acc_opts)};
}

}  // namespace cuda
}  // namespace udat

// The emulation build registers these under other names (tests/cuda_emu/register.cpp).
#if !defined(UDAT_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(udat_kernels, CUDA, m) {
  m.impl("margin_ce_fwd", &udat::cuda::margin_ce_fwd_cuda);
  m.impl("margin_ce_bwd", &udat::cuda::margin_ce_bwd_cuda);
  m.impl("margin_ce_shard_fwd", &udat::cuda::margin_ce_shard_fwd_cuda);
  m.impl("margin_ce_shard_bwd", &udat::cuda::margin_ce_shard_bwd_cuda);
}
#endif
