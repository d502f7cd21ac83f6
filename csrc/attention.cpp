// The elementwise halves of packed (varlen) attention's backward on the CPU, one segment at a time. The
// segment's products (scores, dP, dQ, dK, dV) are BLAS calls made by lf/kernels/packed_attention.py; these two
// passes between them read each score row once, where torch would make five passes with fp32 temporaries.
#include <vector>
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

template <class T> struct Run {
  static void run(const AttnBlock& a) {
    const int64_t n = a.n;
#pragma omp parallel num_threads(a.threads)
    {
      std::vector<float> buf(2 * n);
      float* x = buf.data();
      float* y = x + n;
      // Causal rows grow in length: small dynamic chunks keep both threads busy to the end.
#pragma omp for schedule(dynamic, 16)
      for (int64_t r = 0; r < a.rows; ++r) {
        const int64_t len = r % n + 1;  // row r holds query r % n, which sees keys 0..r % n
        T* out;
        if (!a.grad) {
          out = static_cast<T*>(a.p) + r * n;
          widen(static_cast<const T*>(a.s) + r * n, x, len);
          const float shift = a.lse[r], scale = a.scale;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) y[j] = vexp(x[j] * scale - shift);
        } else {
          out = static_cast<T*>(a.dp) + r * n;
          const T* o = static_cast<const T*>(a.o) + r * a.dim;
          const T* dout = static_cast<const T*>(a.dout) + r * a.dim;
          float delta = 0.f;  // rowsum(O * dO) = rowsum(P * dP): softmax's backward shift
#pragma omp simd reduction(+ : delta)
          for (int64_t d = 0; d < a.dim; ++d) delta += load(o[d]) * load(dout[d]);
          widen(static_cast<const T*>(a.p) + r * n, x, len);
          widen(static_cast<const T*>(a.dp) + r * n, y, len);
          const float scale = a.scale;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) y[j] = x[j] * (y[j] - delta) * scale;
        }
        narrow(y, out, len);
        std::memset(static_cast<void*>(out + len), 0, (n - len) * sizeof(T));  // above the diagonal; 0 in every dtype
      }
    }
  }
};

}  // namespace

void attn_block(const AttnBlock& a) { by_dtype<Run>(a); }

}}  // namespace lf::LF_ISA
