// Per-channel sums for BatchNorm's training step on CPU, as XLA FFI custom calls.
//
//   resjax_channel_moments          (x)              -> (sum x, sum x*x)
//   resjax_channel_grad_moments     (g, x, mean)     -> (sum g, sum g*(x - mean))
//   resjax_channel_grad_moments_row (g, xs, i, mean) -> the same with x row i of the stack xs
//   resjax_channel_grad_apply       (g, x, coef)     -> BatchNorm's input gradient (below)
//   resjax_channel_grad_apply_row   (g, xs, i, coef) -> the same with x row i of the stack xs
//
// The backward pass's sums take x and its per-channel mean, so that x - mean is formed in registers
// rather than as a map of its own; the _row variant reads x in place from a scan's stack of saved
// inputs (i clamped to the stack, as a dynamic slice would; resjax/kernels/stacks.py).
//
// Sums run over every dimension of x but the last (the channels), within each replica: the
// attribute `reduced` is how many dimensions before the channels are summed, and any before those
// are replicas (resjax's seeds under vmap), with outputs of shape (replicas..., channels). Both
// sums are taken in one pass over the operands, where XLA:CPU reduces each on its own (README,
// Speed). Large operands are split between the OpenMP threads (oneDNN's team), each with partial
// sums of its own, added in thread order. Partial sums of up to kChunk rows are float32, the
// totals double; the results are float32.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 64;  // rows summed in float32 before adding into the double totals

struct Layout {
  int64_t replicas = 1, rows = 1, channels = 0;
};

// The operand's replicas, rows and channels; channels < 0 where `reduced` does not fit its rank.
Layout layout(ffi::Buffer<ffi::F32>::Dimensions d, int64_t reduced) {
  Layout l;
  if (reduced < 0 || reduced + 1 > static_cast<int64_t>(d.size())) {
    l.channels = -1;
    return l;
  }
  l.channels = d[d.size() - 1];
  int64_t lead = d.size() - 1 - reduced;
  for (int64_t i = 0; i < lead; ++i) l.replicas *= d[i];
  for (int64_t i = lead; i < static_cast<int64_t>(d.size()) - 1; ++i) l.rows *= d[i];
  return l;
}

constexpr int64_t kRowsPerThread = 2048;  // vector rows below which a second thread costs more
constexpr int64_t kWide = 64;  // elements per vector row: 64 % channels == 0 takes the fast loop

// One pass over `rows` rows of `w` elements: s1 += sum of t1, s2 += sum of t2 per column, where
// Pass::terms(a, b, m) gives (t1, t2) of an element, m its column's entry of `shift`. W > 0 fixes
// the width at compile time (the partial sums then live in registers); W == 0 takes it from `w`.
template <int W, typename Pass>
__attribute__((always_inline)) inline void sweep(const float* __restrict a,
                                                 const float* __restrict b,
                                                 const float* __restrict shift, int64_t rows,
                                                 int64_t w, double* __restrict s1,
                                                 double* __restrict s2) {
  constexpr int64_t kMax = W > 0 ? W : 256;
  const int64_t n = W > 0 ? W : w;
  for (int64_t j0 = 0; j0 < n; j0 += kMax) {  // W == 0: columns in slices of kMax
    const int64_t cols = W > 0 ? W : std::min<int64_t>(kMax, n - j0);
    for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
      const int64_t r1 = std::min(rows, r0 + kChunk);
      float p1[kMax] = {}, p2[kMax] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const float* ar = a + r * n + j0;
        const float* br = b + r * n + j0;
        for (int64_t k = 0; k < cols; ++k) {
          float t1, t2;
          Pass::terms(ar[k], br[k], shift[j0 + k], t1, t2);
          p1[k] += t1;
          p2[k] += t2;
        }
      }
      for (int64_t k = 0; k < cols; ++k) {
        s1[j0 + k] += p1[k];
        s2[j0 + k] += p2[k];
      }
    }
  }
}

struct MomentTerms {  // (x, x * x)
  static inline void terms(float x, float, float, float& t1, float& t2) {
    t1 = x;
    t2 = x * x;
  }
};

struct GradTerms {  // (g, g * (x - mean))
  static inline void terms(float g, float x, float mean, float& t1, float& t2) {
    t1 = g;
    t2 = g * (x - mean);
  }
};

template <typename Pass>
__attribute__((target_clones("avx512f", "avx2", "default")))
void sweep_wide(const float* a, const float* b, const float* shift, int64_t rows, double* s1,
                double* s2) {
  sweep<kWide, Pass>(a, b, shift, rows, kWide, s1, s2);
}

template <typename Pass>
__attribute__((target_clones("avx512f", "avx2", "default")))
void sweep_any(const float* a, const float* b, const float* shift, int64_t rows, int64_t c,
               double* s1, double* s2) {
  sweep<0, Pass>(a, b, shift, rows, c, s1, s2);
}

// Per-channel sums of Pass's terms over `rows` rows of `c` channels into s1 and s2 (zeroed here),
// `shift` one value per channel. Where c divides kWide and the rows fill whole vector rows, the
// data is read as rows of kWide elements (several pixels each) and the columns folded onto their
// channels at the end.
template <typename Pass>
void channel_sums(const float* a, const float* b, const float* shift, int64_t rows, int64_t c,
                  double* s1, double* s2) {
  std::fill(s1, s1 + c, 0.0);
  std::fill(s2, s2 + c, 0.0);
  if (kWide % c == 0 && (rows * c) % kWide == 0) {
    const int64_t wide_rows = rows * c / kWide;
    float wide_shift[kWide];
    for (int64_t k = 0; k < kWide; ++k) wide_shift[k] = shift[k % c];
    const int teams = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(omp_get_max_threads(), wide_rows / kRowsPerThread)));
    std::vector<double> parts(2 * kWide * teams, 0.0);  // each thread's (s1, s2) by column
#pragma omp parallel num_threads(teams)
    {
      const int t = omp_get_thread_num();
      const int64_t r0 = wide_rows * t / teams, r1 = wide_rows * (t + 1) / teams;
      sweep_wide<Pass>(a + r0 * kWide, b + r0 * kWide, wide_shift, r1 - r0,
                       &parts[2 * kWide * t], &parts[2 * kWide * t + kWide]);
    }
    for (int t = 0; t < teams; ++t) {  // in thread order: the same sums for the same team size
      for (int64_t k = 0; k < kWide; ++k) {
        s1[k % c] += parts[2 * kWide * t + k];
        s2[k % c] += parts[2 * kWide * t + kWide + k];
      }
    }
  } else {
    sweep_any<Pass>(a, b, shift, rows, c, s1, s2);
  }
}

// Pass's two sums of (a, b) for each replica into out1 and out2, (replicas, channels) each; `b`
// holds b_count elements (a's count), `shift` one value per channel for each replica, or nullptr
// for zeros.
template <typename Pass>
ffi::Error replica_sums(ffi::Buffer<ffi::F32> a, const float* b, int64_t b_count,
                        const float* shift, ffi::ResultBuffer<ffi::F32> out1,
                        ffi::ResultBuffer<ffi::F32> out2, int64_t reduced) {
  Layout l = layout(a.dimensions(), reduced);
  if (l.channels < 0) return ffi::Error::InvalidArgument("channel sums: rank below `reduced` + 1");
  if (static_cast<int64_t>(a.element_count()) != b_count) {
    return ffi::Error::InvalidArgument("channel sums: the two operands differ in size");
  }
  const int64_t c = l.channels;
  if (c == 0) return ffi::Error::Success();
  std::vector<double> s1(c), s2(c);
  std::vector<float> zeros(shift ? 0 : c, 0.0f);
  for (int64_t i = 0; i < l.replicas; ++i) {
    const int64_t at = i * l.rows * c;
    channel_sums<Pass>(a.typed_data() + at, b + at, shift ? shift + i * c : zeros.data(), l.rows,
                       c, s1.data(), s2.data());
    for (int64_t k = 0; k < c; ++k) {
      out1->typed_data()[i * c + k] = static_cast<float>(s1[k]);
      out2->typed_data()[i * c + k] = static_cast<float>(s2[k]);
    }
  }
  return ffi::Error::Success();
}

ffi::Error Moments(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> sum,
                   ffi::ResultBuffer<ffi::F32> sum_sq, int64_t reduced) {
  return replica_sums<MomentTerms>(x, x.typed_data(), x.element_count(), nullptr, sum, sum_sq,
                                   reduced);
}

// GradTerms' sums of g and of x, `x_count` elements, after checking one mean per sum.
ffi::Error grad_sums(ffi::Buffer<ffi::F32> g, const float* x, int64_t x_count,
                     ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> sum,
                     ffi::ResultBuffer<ffi::F32> sum_product, int64_t reduced) {
  if (mean.element_count() != sum->element_count()) {
    return ffi::Error::InvalidArgument("channel grad sums: one mean per channel and replica");
  }
  return replica_sums<GradTerms>(g, x, x_count, mean.typed_data(), sum, sum_product, reduced);
}

ffi::Error GradMoments(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> sum, ffi::ResultBuffer<ffi::F32> sum_product,
                       int64_t reduced) {
  return grad_sums(g, x.typed_data(), x.element_count(), mean, sum, sum_product, reduced);
}

// Row `index` of the stack `xs` (clamped to it, as a dynamic slice would be): its first element and
// its element count.
struct Row {
  const float* data;
  int64_t count;
};

Row row_of(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::S32> index) {
  const int64_t n = xs.dimensions().size() == 0 ? 1 : xs.dimensions()[0];
  const int64_t row = n == 0 ? 0 : static_cast<int64_t>(xs.element_count()) / n;
  const int64_t i = std::clamp<int64_t>(index.typed_data()[0], 0, std::max<int64_t>(n - 1, 0));
  return {xs.typed_data() + i * row, row};
}

ffi::Error GradMomentsRow(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> xs,
                          ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> mean,
                          ffi::ResultBuffer<ffi::F32> sum, ffi::ResultBuffer<ffi::F32> sum_product,
                          int64_t reduced) {
  const Row x = row_of(xs, index);
  return grad_sums(g, x.data, x.count, mean, sum, sum_product, reduced);
}

// BatchNorm's input gradient, one elementwise pass split between the OpenMP threads, where XLA:CPU
// would run it on its pool's one thread (resjax.kernels.one_pool_thread). coef holds 7 values per
// channel and replica, (replicas, 7, channels): mean, a, d, p, q, gm, h, and with xc = x - mean
//   dx = (a * (g - d - (xc * p) * q) + gm) + h * xc
// in that order of operations (resjax.models.layers._bn_bwd writes the same expression for XLA),
// its products and sums fused into FMAs where the instruction set has them.
constexpr int kCoefs = 7;

template <int W>
__attribute__((always_inline)) inline void grad_apply_rows(const float* __restrict g,
                                                           const float* __restrict x,
                                                           const float* __restrict coef,
                                                           int64_t rows, int64_t w,
                                                           float* __restrict dx) {
  const int64_t n = W > 0 ? W : w;
  const float *mean = coef, *a = coef + n, *d = coef + 2 * n, *p = coef + 3 * n;
  const float *q = coef + 4 * n, *gm = coef + 5 * n, *h = coef + 6 * n;
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * n;
    const float* xr = x + r * n;
    float* out = dx + r * n;
    for (int64_t k = 0; k < n; ++k) {
      const float xc = xr[k] - mean[k];
      out[k] = (a[k] * (gr[k] - d[k] - (xc * p[k]) * q[k]) + gm[k]) + h[k] * xc;
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void grad_apply_wide(const float* g, const float* x, const float* coef, int64_t rows, float* dx) {
  grad_apply_rows<kWide>(g, x, coef, rows, kWide, dx);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void grad_apply_any(const float* g, const float* x, const float* coef, int64_t rows, int64_t c,
                    float* dx) {
  grad_apply_rows<0>(g, x, coef, rows, c, dx);
}

ffi::Error grad_apply(ffi::Buffer<ffi::F32> g, const float* x, int64_t x_count,
                      ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> dx,
                      int64_t reduced) {
  Layout l = layout(g.dimensions(), reduced);
  if (l.channels < 0) return ffi::Error::InvalidArgument("channel grad apply: rank below `reduced` + 1");
  if (static_cast<int64_t>(g.element_count()) != x_count) {
    return ffi::Error::InvalidArgument("channel grad apply: g and x differ in size");
  }
  const int64_t c = l.channels;
  if (static_cast<int64_t>(coef.element_count()) != l.replicas * kCoefs * c) {
    return ffi::Error::InvalidArgument("channel grad apply: 7 coefficients per channel and replica");
  }
  if (c == 0) return ffi::Error::Success();
  for (int64_t i = 0; i < l.replicas; ++i) {
    const int64_t at = i * l.rows * c;
    const float* cf = coef.typed_data() + i * kCoefs * c;
    const float* gi = g.typed_data() + at;
    const float* xi = x + at;
    float* out = dx->typed_data() + at;
    const int teams = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(omp_get_max_threads(), l.rows * c / kWide / kRowsPerThread)));
#pragma omp parallel num_threads(teams)
    {
      const int t = omp_get_thread_num();
      const int64_t r0 = l.rows * t / teams, r1 = l.rows * (t + 1) / teams;
      if (c == kWide) {
        grad_apply_wide(gi + r0 * c, xi + r0 * c, cf, r1 - r0, out + r0 * c);
      } else {
        grad_apply_any(gi + r0 * c, xi + r0 * c, cf, r1 - r0, c, out + r0 * c);
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error GradApply(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> coef,
                     ffi::ResultBuffer<ffi::F32> dx, int64_t reduced) {
  return grad_apply(g, x.typed_data(), x.element_count(), coef, dx, reduced);
}

ffi::Error GradApplyRow(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> xs,
                        ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> coef,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t reduced) {
  const Row x = row_of(xs, index);
  return grad_apply(g, x.data, x.count, coef, dx, reduced);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxChannelGradApply, GradApply,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("reduced"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxChannelGradApplyRow, GradApplyRow,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("reduced"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxChannelMoments, Moments,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("reduced"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxChannelGradMoments, GradMoments,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("reduced"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResjaxChannelGradMomentsRow, GradMomentsRow,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("reduced"));
