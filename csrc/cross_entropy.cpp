// Cross-entropy over the vocabulary on the CPU, one row per iteration, rows shared across threads.
// A row is read in L1-sized blocks widened to fp32: the first pass keeps an online log-sum-exp (one exp per
// element), the second writes the gradient (softmax minus the smoothed one-hot, times the caller's scale)
// block by block, so it may overwrite the logits it reads.
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

constexpr int64_t kBlock = 2048;  // fp32 elements: 8 KiB, stays in L1 between the block's loops

// tanh without cancellation: an odd Taylor polynomial near 0 (error < 1e-12 for |u| < 0.125), else
// 1 - 2 / (1 + exp(2|u|)), which saturates to 1 without overflow (vexp clamps its input).
inline float vtanh(float u) {
  const float a = std::fabs(u), u2 = u * u;
  const float near0 = u * (1.f + u2 * (-1.f / 3 + u2 * (2.f / 15 + u2 * (-17.f / 315 + u2 * (62.f / 2835)))));
  const float far = 1.f - 2.f / (1.f + vexp(2.f * a));
  return a < 0.125f ? near0 : (u < 0.f ? -far : far);
}

// Loads block [b, b + n) of a row into z as fp32, soft-capped when Cap.
template <class T, bool Cap> inline void load_block(const T* x, float* z, int64_t n, float cap, float inv_cap) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = load(x[i]);
    z[i] = Cap ? cap * vtanh(v * inv_cap) : v;
  }
}

template <class T, bool Cap> void rows(const CrossEntropy& p) {
  const T* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad);
  const int64_t V = p.vocab;
  const float cap = p.softcap, inv_cap = Cap ? 1.f / p.softcap : 0.f;
  const float eps = p.smoothing, eps_v = p.smoothing / float(V);
#pragma omp parallel for schedule(guided) num_threads(p.threads)
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t y = p.labels[r];
    const T* x = logits + r * V;
    T* g = grad ? grad + r * V : nullptr;
    if (y == p.ignore_index) {  // no loss, a zero gradient, no exp work
      p.loss[r] = 0.f;
      if (g) std::memset(static_cast<void*>(g), 0, sizeof(T) * V);
      continue;
    }
    alignas(64) float z[kBlock];
    float m = -3.0e38f, s = 0.f, zsum = 0.f;
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t n = std::min(kBlock, V - b);
      load_block<T, Cap>(x + b, z, n, cap, inv_cap);
      float bm = -3.0e38f;
#pragma omp simd reduction(max : bm)
      for (int64_t i = 0; i < n; ++i) bm = z[i] > bm ? z[i] : bm;
      if (bm > m) { s *= vexp(m - bm); m = bm; }  // rescale the running sum to the new maximum
      float bs = 0.f, bz = 0.f;
#pragma omp simd reduction(+ : bs, bz)
      for (int64_t i = 0; i < n; ++i) { bs += vexp(z[i] - m); bz += z[i]; }
      s += bs;
      zsum += bz;
    }
    // Kept apart, m and log(s) lose nothing when the logits are large (lse itself would round to ulp(m)).
    const float log_s = std::log(s), lse = m + log_s;
    float zy;
    load_block<T, Cap>(x + y, &zy, 1, cap, inv_cap);
    p.loss[r] = log_s + (1.f - eps) * (m - zy) + eps * (m - zsum / float(V)) + p.z_loss * lse * lse;
    if (!g) continue;
    // d loss / dz_j = softmax_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y], then times dz/dx (softcap)
    const float c = p.grad_scale * (1.f + 2.f * p.z_loss * lse), d = p.grad_scale * eps_v;
    const float hit = p.grad_scale * (1.f - eps);
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t n = std::min(kBlock, V - b);
      load_block<T, Cap>(x + b, z, n, cap, inv_cap);
      alignas(64) float gz[kBlock];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gz[i] = vexp((z[i] - m) - log_s) * c - d;
      if (y >= b && y < b + n) gz[y - b] -= hit;
      if (Cap) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) { const float t = z[i] * inv_cap; gz[i] *= 1.f - t * t; }
      }
      narrow(gz, g + b, n);
    }
  }
}

template <class T> struct Rows {
  static void run(const CrossEntropy& p) {
    if (p.softcap > 0.f) rows<T, true>(p);
    else rows<T, false>(p);
  }
};

}  // namespace

void cross_entropy(const CrossEntropy& p) { by_dtype<Rows>(p); }

}}  // namespace lf::LF_ISA
