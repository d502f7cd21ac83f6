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
    const bool llama = a.casting == kLlama;
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

template <class T> struct Bwd {
  static void run(const RmsNormBwd& a) {
    const T* dy = static_cast<const T*>(a.dy);
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* dx = static_cast<T*>(a.dx);
    const int64_t cols = a.cols;
    const bool llama = a.casting == kLlama;
    const bool want_dw = a.dw != nullptr;
    std::vector<float> scale(cols);
    for (int64_t c = 0; c < cols; ++c) scale[c] = a.offset + load(w[c]);
    const float* s = scale.data();
    const int threads = a.threads;
    // Per-thread fp32 partial sums of dw (threads x cols), reduced at the end: no rows x cols temporary.
    std::vector<float> partial(want_dw ? size_t(threads) * cols : 0, 0.f);
#pragma omp parallel num_threads(threads)
    {
      float* pdw = want_dw ? partial.data() + size_t(omp_get_thread_num()) * cols : nullptr;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < a.rows; ++r) {
        const T* xr = x + r * cols;
        const T* dyr = dy + r * cols;
        T* dxr = dx + r * cols;
        const float rs = a.rstd[r];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < cols; ++c) dot += load(dyr[c]) * s[c] * load(xr[c]);
        const float k = dot * rs * rs / float(cols);  // mean(g * xhat) / rstd, folded
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const float xv = load(xr[c]);
          dxr[c] = store<T>(rs * (load(dyr[c]) * s[c] - xv * k));
        }
        if (want_dw) {
          if (llama) {  // HF multiplies the weight by the normalised row rounded to the input dtype
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) pdw[c] += load(dyr[c]) * round_to<T>(load(xr[c]) * rs);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) pdw[c] += load(dyr[c]) * (load(xr[c]) * rs);
          }
        }
      }
    }
    if (!want_dw) return;
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
