// Rotary position embedding on the CPU, HF's rotate_half pairing (element i with i + dim/2).
// q and k are rotated in one pass over positions, so cos/sin are converted once per position.
#include <vector>
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

template <class T>
inline void rotate_heads(const RopeTensor& t, int64_t b, int64_t s, int64_t half,
                         const float* c, const float* sn, bool backward) {
  for (int64_t h = 0; h < t.heads; ++h) {
    const T* in = static_cast<const T*>(t.src) + b * t.src_stride[0] + h * t.src_stride[1] + s * t.src_stride[2];
    T* out = static_cast<T*>(t.dst) + b * t.dst_stride[0] + h * t.dst_stride[1] + s * t.dst_stride[2];
    if (!backward) {
      // out1 = x1 c1 - x2 s1 ; out2 = x2 c2 + x1 s2
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = load(in[i]), x2 = load(in[i + half]);
        out[i] = store<T>(x1 * c[i] - x2 * sn[i]);
        out[i + half] = store<T>(x2 * c[i + half] + x1 * sn[i + half]);
      }
    } else {
      // The transpose of the forward map: g1 = d1 c1 + d2 s2 ; g2 = d2 c2 - d1 s1
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float d1 = load(in[i]), d2 = load(in[i + half]);
        out[i] = store<T>(d1 * c[i] + d2 * sn[i + half]);
        out[i + half] = store<T>(d2 * c[i + half] - d1 * sn[i]);
      }
    }
  }
}

template <class T> struct Run {
  static void run(const Rope& a) {
    const T* cos = static_cast<const T*>(a.cos);
    const T* sin = static_cast<const T*>(a.sin);
    const int64_t dim = a.dim, half = dim / 2, positions = a.batch * a.seq;
#pragma omp parallel num_threads(a.threads)
    {
      std::vector<float> cs(2 * dim);
      float* c = cs.data();
      float* sn = c + dim;
#pragma omp for schedule(dynamic, 16)  // a thread descheduled on a busy machine holds back 16 positions
      for (int64_t p = 0; p < positions; ++p) {
        const int64_t b = p / a.seq, s = p % a.seq;
        const int64_t off = b * a.cs_stride[0] + s * a.cs_stride[1];
        for (int64_t i = 0; i < dim; ++i) { c[i] = load(cos[off + i]); sn[i] = load(sin[off + i]); }
        rotate_heads<T>(a.q, b, s, half, c, sn, a.backward);
        rotate_heads<T>(a.k, b, s, half, c, sn, a.backward);
      }
    }
  }
};

}  // namespace

void rope(const Rope& a) { by_dtype<Run>(a); }

}}  // namespace lf::LF_ISA
