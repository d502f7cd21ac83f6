// RMSNorm forward and backward on the CPU: one row per iteration, rows split across threads.
#include <vector>
#include <omp.h>
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

template <class T> struct Fwd {
  static void run(const RmsNormFwd& a) {
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* y = static_cast<T*>(a.y);
    const int64_t cols = a.cols;
    std::vector<float> scale(cols);  // offset + w in fp32, shared by all rows
    for (int64_t c = 0; c < cols; ++c) scale[c] = a.offset + load(w[c]);
    const float* s = scale.data();
    const bool llama = a.casting == Casting::llama;
#pragma omp parallel for schedule(static) num_threads(a.threads)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* xr = x + r * cols;
      T* yr = y + r * cols;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) { float v = load(xr[c]); ss += v * v; }
      const float rs = 1.0f / std::sqrt(ss / float(cols) + a.eps);
      a.rstd[r] = rs;
      if (llama) {  // HF Llama: normalise in fp32, round to the input dtype, then scale
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) yr[c] = store<T>(round_to<T>(load(xr[c]) * rs) * s[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) yr[c] = store<T>(load(xr[c]) * rs * s[c]);
      }
    }
  }
};

// One row of the backward pass: dx, and (with Dw) this row's term of dw added to the thread's partial sum.
// A second pass over the row after the dot product; dx and dw share it.
template <class T, bool Dw, bool Llama>
inline void bwd_row(const T* dyr, const T* xr, const float* s, T* dxr, float* pdw, int64_t cols, float rs) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < cols; ++c) dot += load(dyr[c]) * s[c] * load(xr[c]);
  const float k = dot * rs * rs / float(cols);  // mean(g * xhat) / rstd, folded
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const float xv = load(xr[c]), dyv = load(dyr[c]);
    dxr[c] = store<T>(rs * (dyv * s[c] - xv * k));
    // HF Llama multiplies the weight by the normalised row rounded to the input dtype
    if (Dw) pdw[c] += dyv * (Llama ? round_to<T>(xv * rs) : xv * rs);
  }
}

template <class T> struct Bwd {
  static void run(const RmsNormBwd& a) {
    if (!a.dw) rows<false, false>(a);
    else if (a.casting == Casting::llama) rows<true, true>(a);
    else rows<true, false>(a);
  }

  template <bool Dw, bool Llama> static void rows(const RmsNormBwd& a) {
    const T* dy = static_cast<const T*>(a.dy);
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* dx = static_cast<T*>(a.dx);
    const int64_t cols = a.cols;
    std::vector<float> scale(cols);
    for (int64_t c = 0; c < cols; ++c) scale[c] = a.offset + load(w[c]);
    const int threads = a.threads;
    // Per-thread fp32 partial sums of dw (threads x cols), reduced at the end: no rows x cols temporary.
    std::vector<float> partial(Dw ? size_t(threads) * cols : 0, 0.f);
#pragma omp parallel num_threads(threads)
    {
      float* pdw = Dw ? partial.data() + size_t(omp_get_thread_num()) * cols : nullptr;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < a.rows; ++r)
        bwd_row<T, Dw, Llama>(dy + r * cols, x + r * cols, scale.data(), dx + r * cols, pdw, cols, a.rstd[r]);
    }
    if (!Dw) return;
    T* dw = static_cast<T*>(a.dw);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < cols; ++c) {
      float acc = 0.f;
      for (int t = 0; t < threads; ++t) acc += partial[size_t(t) * cols + c];
      dw[c] = store<T>(acc);
    }
  }
};

}  // namespace

void rms_norm_fwd(const RmsNormFwd& a) { by_dtype<Fwd>(a); }
void rms_norm_bwd(const RmsNormBwd& a) { by_dtype<Bwd>(a); }

}}  // namespace lf::LF_ISA
