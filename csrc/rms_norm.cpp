// RMSNorm forward and backward on the CPU: one row per iteration, rows split across threads. One OpenMP region
// per call and no allocation after the first: the weight is read in place (offset + w[c]), the backward's per-thread
// fp32 dw partial sums live in a buffer kept between calls and are reduced inside the same region.
#include <vector>
#include <omp.h>
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

template <class T> struct Fwd {
  static void run(const RmsNormFwd& a) {
    if (a.casting == Casting::llama) rows<true>(a);
    else rows<false>(a);
  }

  template <bool Llama> static void rows(const RmsNormFwd& a) {
    const T* x = static_cast<const T*>(a.x);
    const T* w = static_cast<const T*>(a.w);
    T* y = static_cast<T*>(a.y);
    const int64_t cols = a.cols;
    const float offset = a.offset;
    // dynamic: a thread descheduled on a busy machine holds back 16 rows, not half of them
#pragma omp parallel for schedule(dynamic, 16) num_threads(a.threads)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* xr = x + r * cols;
      T* yr = y + r * cols;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) { float v = load(xr[c]); ss += v * v; }
      const float rs = 1.0f / std::sqrt(ss / float(cols) + a.eps);
      a.rstd[r] = rs;
      // HF Llama: normalise in fp32, round to the input dtype, then scale
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float n = load(xr[c]) * rs;
        yr[c] = store<T>((Llama ? round_to<T>(n) : n) * (offset + load(w[c])));
      }
    }
  }
};

// R consecutive rows of the backward pass: dx, and (with Dw) their terms of dw added to the thread's partial sum
// once for all R rows, which cuts the partial's read-modify-write traffic R-fold. A second pass over the rows
// (in L2 by then) after their dot products; dx and dw share it.
template <class T, int R, bool Dw, bool Llama>
inline void bwd_rows(const T* dy, const T* x, const T* w, float offset, T* dx, float* pdw, int64_t cols,
                     const float* rstd) {
  float rs[R], k[R];
  for (int j = 0; j < R; ++j) {
    const T *dyr = dy + j * cols, *xr = x + j * cols;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < cols; ++c) dot += load(dyr[c]) * (offset + load(w[c])) * load(xr[c]);
    rs[j] = rstd[j];
    k[j] = dot * rs[j] * rs[j] / float(cols);  // mean(g * xhat) / rstd, folded
  }
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const float g = offset + load(w[c]);
    float acc = 0.f;
    for (int j = 0; j < R; ++j) {
      const float xv = load(x[j * cols + c]), dyv = load(dy[j * cols + c]);
      dx[j * cols + c] = store<T>(rs[j] * (dyv * g - xv * k[j]));
      // HF Llama multiplies the weight by the normalised row rounded to the input dtype
      acc += dyv * (Llama ? round_to<T>(xv * rs[j]) : xv * rs[j]);
    }
    if (Dw) pdw[c] += acc;
  }
}

constexpr int kBlock = 4;  // rows per dw update

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
    T* dw = static_cast<T*>(a.dw);
    const int64_t cols = a.cols;
    // Per-thread fp32 partial sums of dw (threads x cols): no rows x cols temporary, and kept for the next call.
    static thread_local std::vector<float> partial;
    if (Dw && partial.size() < size_t(a.threads) * cols) partial.resize(size_t(a.threads) * cols);
    float* const parts = partial.data();
#pragma omp parallel num_threads(a.threads)
    {
      const int team = omp_get_num_threads();  // the partials of this many threads are summed
      float* pdw = Dw ? parts + size_t(omp_get_thread_num()) * cols : nullptr;
      if (Dw) std::fill(pdw, pdw + cols, 0.f);
      // blocks of kBlock rows (the last, partial block row by row), handed out dynamically as in the forward
      const int64_t blocks = (a.rows + kBlock - 1) / kBlock;
#pragma omp for schedule(dynamic, 4)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t r0 = b * kBlock, n = std::min<int64_t>(kBlock, a.rows - r0);
        const int64_t o = r0 * cols;
        if (n == kBlock) {
          bwd_rows<T, kBlock, Dw, Llama>(dy + o, x + o, w, a.offset, dx + o, pdw, cols, a.rstd + r0);
        } else {
          for (int64_t r = r0; r < r0 + n; ++r)
            bwd_rows<T, 1, Dw, Llama>(dy + r * cols, x + r * cols, w, a.offset, dx + r * cols, pdw, cols, a.rstd + r);
        }
      }
      if (Dw) {  // after the loop's barrier: every partial is complete
#pragma omp for simd schedule(static)
        for (int64_t c = 0; c < cols; ++c) {
          float acc = parts[c];
          for (int t = 1; t < team; ++t) acc += parts[size_t(t) * cols + c];
          dw[c] = store<T>(acc);
        }
      }
    }
  }
};

}  // namespace

void rms_norm_fwd(const RmsNormFwd& a) { by_dtype<Fwd>(a); }
void rms_norm_bwd(const RmsNormBwd& a) { by_dtype<Bwd>(a); }

}}  // namespace lf::LF_ISA
