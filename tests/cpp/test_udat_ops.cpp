// C++ tests of the margin math header, of the CPU op and of the loss op's autograd, through the
// dispatcher, against straightforward double-precision loops written here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>
#include <tuple>

#include "margin_math.h"

static int failures = 0;

#define CHECK_NEAR(a, b, tol)                                                             \
  do {                                                                                    \
    const double _a = (a), _b = (b);                                                      \
    if (!(std::fabs(_a - _b) <= (tol) * (1.0 + std::fabs(_b)))) {                         \
      std::printf("FAIL %s:%d: %s = %.12g, expected %.12g\n", __FILE__, __LINE__, #a, _a, \
                  _b);                                                                    \
      ++failures;                                                                         \
    }                                                                                     \
  } while (0)

static void test_margin_math() {
  const double m = 0.5, m3 = 0.1;
  const auto p = udat::make_margin_params(64.0, m, m3, false);
  for (double c : {-0.99, -0.5, 0.0, 0.3, 0.9, 0.999}) {
    const double expected = c > std::cos(M_PI - m) ? std::cos(std::acos(c) + m) - m3
                                                   : c - m * std::sin(m) - m3;
    CHECK_NEAR(udat::margin_psi(c, p), expected, 1e-12);
    if (std::fabs(c - std::cos(M_PI - m)) > 1e-3) {
      const double h = 1e-6;
      const double numeric = (udat::margin_psi(c + h, p) - udat::margin_psi(c - h, p)) / (2 * h);
      CHECK_NEAR(udat::margin_dpsi(c, p), numeric, 1e-5);
    }
  }
  const auto st = udat::make_margin_params(64.0, m, 0.0, true);
  CHECK_NEAR(udat::margin_dpsi(0.7, st), 1.0, 0.0);
  CHECK_NEAR(udat::margin_psi(1.5, p), udat::margin_psi(1.0, p), 0.0);  // clamped

  // Online log-sum-exp, pushed one by one and merged in two halves.
  const double zs[] = {3.0, -1.0, 10.0, 0.5, 9.0};
  double direct = 0;
  for (double z : zs) direct += std::exp(z);
  double m1 = -INFINITY, s1 = 0, m2 = -INFINITY, s2 = 0;
  for (int i = 0; i < 2; ++i) udat::lse_push(m1, s1, zs[i]);
  for (int i = 2; i < 5; ++i) udat::lse_push(m2, s2, zs[i]);
  udat::lse_merge(m1, s1, m2, s2);
  CHECK_NEAR(udat::lse_finish(m1, s1), std::log(direct), 1e-12);
}

// log-sum-exp of `zs` by the butterfly the CUDA kernels use: lane l starts from its own values
// (lanes at or beyond zs.size() hold the empty partial), then merges with lane l ^ o for
// o = 16, 8, 4, 2, 1. Returns lane `lane`'s result, so every lane can be checked.
static double butterfly_lse(const std::vector<double>& zs, int lane) {
  constexpr int kLanes = 32;
  double m[kLanes], s[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    m[l] = -INFINITY;
    s[l] = 0;
    for (size_t j = l; j < zs.size(); j += kLanes) udat::lse_push(m[l], s[l], zs[j]);
  }
  for (int o = kLanes / 2; o > 0; o >>= 1) {
    double m2[kLanes], s2[kLanes];
    for (int l = 0; l < kLanes; ++l) m2[l] = m[l ^ o], s2[l] = s[l ^ o];
    for (int l = 0; l < kLanes; ++l) udat::lse_merge(m[l], s[l], m2[l], s2[l]);
  }
  return udat::lse_finish(m[lane], s[lane]);
}

static double push_lse(const std::vector<double>& zs) {
  double m = -INFINITY, s = 0;
  for (double z : zs) udat::lse_push(m, s, z);
  return udat::lse_finish(m, s);
}

#define CHECK_SAME(a, b)                                                                  \
  do {                                                                                    \
    const double _a = (a), _b = (b);                                                      \
    const bool same = (std::isnan(_a) && std::isnan(_b)) || _a == _b ||                   \
                      std::fabs(_a - _b) <= 1e-12 * (1.0 + std::fabs(_b));                \
    if (!same) {                                                                          \
      std::printf("FAIL %s:%d: %s = %.12g, expected %.12g\n", __FILE__, __LINE__, #a, _a, \
                  _b);                                                                    \
      ++failures;                                                                         \
    }                                                                                     \
  } while (0)

// Non-finite values in the online log-sum-exp follow torch.logsumexp (docs/math.md,
// "Non-finite inputs"), whichever lane or position holds them.
static void test_lse_non_finite() {
  const double inf = INFINITY, nan = NAN;
  // torch.logsumexp of each row, written out.
  struct Case {
    std::vector<double> zs;
    double expected;
  };
  std::vector<Case> cases = {
      {{1.0, inf, 2.0}, inf},
      {{inf, inf, 3.0}, inf},
      {{-inf, -inf, -inf}, -inf},
      {{-inf, 0.0, -inf}, 0.0},
      {{1.0, nan, 2.0}, nan},
      {{nan, inf, 2.0}, nan},
      {{inf, nan}, nan},
      {{-inf, nan}, nan},
      {{5.0}, 5.0},
  };
  // A row of 70 values (several per lane, some lanes empty after the merge order) with one
  // special value at every position in turn.
  for (double special : {nan, inf}) {
    for (int pos = 0; pos < 70; ++pos) {
      std::vector<double> zs(70);
      for (int j = 0; j < 70; ++j) zs[j] = 0.01 * j - 0.3;
      zs[pos] = special;
      cases.push_back({zs, special});
    }
  }
  {  // two +inf in different lanes, and a NaN in a lane whose max is not the largest
    std::vector<double> zs(40, 1.0);
    zs[3] = inf, zs[20] = inf;
    cases.push_back({zs, inf});
    std::vector<double> zn(40, 1.0);
    zn[7] = 50.0, zn[12] = nan;
    cases.push_back({zn, nan});
  }
  for (const auto& c : cases) {
    CHECK_SAME(push_lse(c.zs), c.expected);
    for (int lane : {0, 5, 31}) CHECK_SAME(butterfly_lse(c.zs, lane), c.expected);
    // Merged from two halves in both orders, and with empty partials on either side.
    for (size_t cut = 0; cut <= c.zs.size(); ++cut) {
      double m1 = -INFINITY, s1 = 0, m2 = -INFINITY, s2 = 0;
      for (size_t j = 0; j < cut; ++j) udat::lse_push(m1, s1, c.zs[j]);
      for (size_t j = cut; j < c.zs.size(); ++j) udat::lse_push(m2, s2, c.zs[j]);
      double ma = m1, sa = s1, mb = m2, sb = s2;
      udat::lse_merge(ma, sa, m2, s2);
      udat::lse_merge(mb, sb, m1, s1);
      CHECK_SAME(udat::lse_finish(ma, sa), c.expected);
      CHECK_SAME(udat::lse_finish(mb, sb), c.expected);
    }
  }
  // The empty partial is neutral and merging two empties stays empty.
  double m = -INFINITY, s = 0;
  udat::lse_merge(m, s, -double(INFINITY), 0.0);
  CHECK_SAME(m, -INFINITY);
  CHECK_SAME(s, 0.0);
}

// loss of the angular head by plain loops: mean reduction, class weights, smoothing.
static double naive_loss(const at::Tensor& x, const at::Tensor& w, const at::Tensor& t,
                         const at::Tensor& cw, double s, double m, double eps) {
  const int64_t B = x.size(0), C = w.size(0), D = x.size(1);
  auto xa = x.accessor<double, 2>();
  auto wa = w.accessor<double, 2>();
  auto ta = t.accessor<int64_t, 1>();
  auto ca = cw.accessor<double, 1>();
  double wsum = 0;
  for (int64_t j = 0; j < C; ++j) wsum += ca[j];
  double total = 0, denom = 0;
  for (int64_t i = 0; i < B; ++i) {
    std::vector<double> z(C);
    double nx = 0;
    for (int64_t d = 0; d < D; ++d) nx += xa[i][d] * xa[i][d];
    for (int64_t j = 0; j < C; ++j) {
      double nw = 0, dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        nw += wa[j][d] * wa[j][d];
        dot += xa[i][d] * wa[j][d];
      }
      const double c = dot / (std::sqrt(nx) * std::sqrt(nw));
      z[j] = s * (j == ta[i] ? std::cos(std::acos(std::fmin(1.0, c)) + m) : c);
    }
    double mx = -INFINITY, se = 0, wz = 0;
    for (double v : z) mx = std::fmax(mx, v);
    for (double v : z) se += std::exp(v - mx);
    const double lse = mx + std::log(se);
    for (int64_t j = 0; j < C; ++j) wz += ca[j] * (lse - z[j]);
    const int64_t y = ta[i];
    total += (1 - eps) * ca[y] * (lse - z[y]) + eps / C * wz;
    denom += ca[y];
  }
  return total / denom;
}

// float64 inputs whose rows lie close to their class centre, which keeps every target cosine
// on ψ's angular branch.
struct Inputs {
  at::Tensor x, w, t;
};
static Inputs near_centre_inputs(int64_t B, int64_t D, int64_t C, uint64_t seed) {
  at::manual_seed(seed);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor w = at::randn({C, D}, opts);
  at::Tensor t = at::randint(0, C, {B}, at::TensorOptions().dtype(at::kLong));
  return {w.index_select(0, t) + 0.3 * at::randn({B, D}, opts), w, t};
}

static auto fwd_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("udat_kernels::margin_ce_fwd", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double,
          double, double, double, int64_t, int64_t, bool, bool)>();
}

static void test_cpu_op() {
  const int64_t C = 5;
  auto [x, w, t] = near_centre_inputs(9, 6, C, 0);
  at::Tensor cw = at::rand({C}, at::TensorOptions().dtype(at::kDouble)) + 0.5;
  auto op = fwd_op();
  const double s = 16.0, m = 0.4, eps = 0.1;
  auto [loss, lse, gx, gw, gb] =
      op.call(x, w, t, std::nullopt, cw, std::nullopt, std::nullopt, true, s, m, 0.0, eps, -100,
              /*mean*/ 1, false, true);
  CHECK_NEAR(loss.item<double>(), naive_loss(x, w, t, cw, s, m, eps), 1e-10);
  if (gx.sizes() != x.sizes() || gw.sizes() != w.sizes()) {
    std::printf("FAIL: gradient shapes\n");
    ++failures;
  }
  // A bad target is a c10::ValueError naming the argument, not a crash.
  bool raised = false;
  try {
    op.call(x, w, t + 100, std::nullopt, std::nullopt, std::nullopt, std::nullopt, true, s, m,
            0.0, 0.0, -100, 1, false, false);
  } catch (const c10::ValueError& e) {
    raised = std::string(e.what()).find("target") != std::string::npos;
  }
  if (!raised) {
    std::printf("FAIL: out-of-range target did not raise a ValueError naming target\n");
    ++failures;
  }
}

// The shard mode (docs/math.md, "Class shards"): two shards of the classes, combined by plain
// loops, give the ordinary op's loss and gradients; a bad target gives NaN, not an exception;
// an offset outside the problem is a ValueError naming class_offset.
static void test_shard_op() {
  const int64_t B = 9, D = 6, C = 5, cut = 2;
  auto [x, w, t] = near_centre_inputs(B, D, C, 2);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor cw = at::rand({C}, opts) + 0.5;
  const double s = 16.0, m = 0.4, eps = 0.1;
  using Opt = const std::optional<at::Tensor>&;
  auto& dispatcher = c10::Dispatcher::singleton();
  auto sfwd = dispatcher.findSchemaOrThrow("udat_kernels::margin_ce_shard_fwd", "")
                  .typed<std::tuple<at::Tensor, at::Tensor>(
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, Opt, Opt, Opt,
                      int64_t, int64_t, bool, double, double, double, double, int64_t, bool)>();
  auto sbwd = dispatcher.findSchemaOrThrow("udat_kernels::margin_ce_shard_bwd", "")
                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      Opt, Opt, Opt, const at::Tensor&, Opt, int64_t, int64_t, bool, double,
                      double, double, double, int64_t, bool)>();
  const at::Tensor w1 = w.narrow(0, 0, cut), w2 = w.narrow(0, cut, C - cut);
  auto [l1, q1] = sfwd.call(x, w1, t, std::nullopt, cw, std::nullopt, 0, C, true, s, m, 0.0, eps,
                            -100, false);
  auto [l2, q2] = sfwd.call(x, w2, t, std::nullopt, cw, std::nullopt, cut, C, true, s, m, 0.0,
                            eps, -100, false);
  // loss_i = (a_i + b·W)·lse_i + q1_i + q2_i with lse_i = log(exp(l1_i) + exp(l2_i)).
  at::Tensor lse = at::empty({B}, opts);
  double total = 0, denom = 0;
  const double wsum = cw.sum().item<double>();
  for (int64_t i = 0; i < B; ++i) {
    const double a = l1[i].item<double>(), b = l2[i].item<double>(), hi = std::fmax(a, b);
    lse[i] = hi + std::log(std::exp(a - hi) + std::exp(b - hi));
    const double wy = cw[t[i].item<int64_t>()].item<double>();
    total += ((1 - eps) * wy + eps / C * wsum) * lse[i].item<double>() + q1[i].item<double>() +
             q2[i].item<double>();
    denom += wy;
  }
  CHECK_NEAR(total / denom, naive_loss(x, w, t, cw, s, m, eps), 1e-10);
  auto whole = fwd_op().call(x, w, t, std::nullopt, cw, std::nullopt, std::nullopt, true, s, m,
                             0.0, eps, -100, /*mean*/ 1, false, true);
  const at::Tensor rows = at::full({B}, 1.0 / denom, opts);
  auto [gx1, gw1, gb1] = sbwd.call(rows, x, w1, t, std::nullopt, cw, std::nullopt, lse,
                                   std::nullopt, 0, C, true, s, m, 0.0, eps, -100, false);
  auto [gx2, gw2, gb2] = sbwd.call(rows, x, w2, t, std::nullopt, cw, std::nullopt, lse,
                                   std::nullopt, cut, C, true, s, m, 0.0, eps, -100, false);
  CHECK_NEAR((gx1 + gx2 - std::get<2>(whole)).abs().max().item<double>(), 0.0, 1e-12);
  CHECK_NEAR((at::cat({gw1, gw2}) - std::get<3>(whole)).abs().max().item<double>(), 0.0, 1e-12);
  // A target outside [0, C): that row's partial is NaN on every shard, the others stay finite.
  at::Tensor bad = t.clone();
  bad[3] = C + 1;
  auto [l3, q3] = sfwd.call(x, w2, bad, std::nullopt, cw, std::nullopt, cut, C, true, s, m, 0.0,
                            eps, -100, false);
  if (!std::isnan(q3[3].item<double>()) || at::isnan(q3).sum().item<int64_t>() != 1) {
    std::printf("FAIL: a bad target did not give exactly one NaN partial\n");
    ++failures;
  }
  bool raised = false;
  try {
    sfwd.call(x, w2, t, std::nullopt, cw, std::nullopt, cut + 1, C, true, s, m, 0.0, eps, -100,
              false);
  } catch (const c10::ValueError& e) {
    raised = std::string(e.what()).find("class_offset") != std::string::npos;
  }
  if (!raised) {
    std::printf("FAIL: a shard past the last class did not raise a ValueError naming "
                "class_offset\n");
    ++failures;
  }
}

// The loss op's autograd (margin_ce_autograd.cpp): both ways to the gradient give the forward
// op's gradient times the upstream one, and differentiating that gradient again raises.
static void test_loss_op_autograd() {
  auto [x, w, t] = near_centre_inputs(7, 5, 4, 1);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto fwd = fwd_op();
  auto loss_op = c10::Dispatcher::singleton().findSchemaOrThrow("udat_kernels::margin_ce", "")
                     .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&, bool, double, double,
                                       double, double, int64_t, int64_t, bool, bool,
                                       c10::string_view)>();
  const at::Tensor lam = at::scalar_tensor(0.5, opts);
  auto expected = fwd.call(x, w, t, std::nullopt, std::nullopt, std::nullopt, lam, true, 16.0,
                           0.4, 0.0, 0.1, -100, 1, false, true);
  for (bool grad_in_forward : {true, false}) {
    at::Tensor xv = x.clone().requires_grad_(true), wv = w.clone().requires_grad_(true);
    at::Tensor loss = loss_op.call(xv, wv, t, std::nullopt, std::nullopt, std::nullopt, lam, true,
                                   16.0, 0.4, 0.0, 0.1, -100, 1, false, grad_in_forward, "");
    auto grads = torch::autograd::grad({loss}, {xv, wv}, {at::scalar_tensor(2.0, opts)},
                                       /*retain_graph=*/true, /*create_graph=*/true);
    CHECK_NEAR((grads[0] - 2 * std::get<2>(expected)).abs().max().item<double>(), 0.0, 1e-12);
    CHECK_NEAR((grads[1] - 2 * std::get<3>(expected)).abs().max().item<double>(), 0.0, 1e-12);
    bool raised = false;
    try {
      torch::autograd::backward({grads[0].sum()});
    } catch (const c10::Error& e) {
      raised = std::string(e.what()).find("double backward") != std::string::npos;
    }
    if (!raised) {
      std::printf("FAIL: double backward did not raise (grad_in_forward=%d)\n", grad_in_forward);
      ++failures;
    }
  }
}

int main() {
  test_margin_math();
  test_lse_non_finite();
  test_cpu_op();
  test_shard_op();
  test_loss_op_autograd();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all C++ checks passed\n");
  return 0;
}
