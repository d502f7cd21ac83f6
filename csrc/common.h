// Shared helpers for lf's CPU kernels: storage types, fp32 conversion, vectorisable math, the
// argument structs (bound to Python once, in bindings.cpp) and the list of kernels. Every kernel file is
// compiled once per instruction set (see CMakeLists.txt) with LF_ISA naming the variant's namespace.
#pragma once
#include <array>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <type_traits>
#include <omp.h>

namespace lf {

// Storage types, named as torch names them (Python maps a tensor's dtype by name).
enum class DType : int { float32, bfloat16, float16 };

struct bf16 { uint16_t bits; };
using f16 = _Float16;

inline float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Loads widen to fp32; every kernel computes in fp32 and rounds once on store.
inline float load(float v) { return v; }
inline float load(bf16 v) { return as_float(uint32_t(v.bits) << 16); }
inline float load(f16 v) { return float(v); }

template <class T> inline T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline f16 store<f16>(float f) { return f16(f); }
template <> inline bf16 store<bf16>(float f) {
  // Round to nearest even, as torch does; NaN stays a (quiet) NaN. Written branch-free to vectorise.
  uint32_t u = as_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}
// The value a fp32 number has once stored as T (used where HF rounds an intermediate).
template <class T> inline float round_to(float f) { return load(store<T>(f)); }

// exp that the compiler can vectorise (libm's expf is a call per element). Cephes' range reduction
// and polynomial: within 2 ulp of expf, denormal results included; inputs outside [-103.9, 88.37] (where
// the result is 0 or overflows) are clamped.
inline float vexp(float x) {
  x = x < -103.9f ? -103.9f : (x > 88.37f ? 88.37f : x);  // not fmin/fmax: they block vectorisation
  // n = round(x / ln2) by the 1.5 * 2^23 trick, which vectorises on every x86-64 (floor needs SSE4.1)
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  // y * 2^n in two steps, y * 2^h then * 2^(n-h) with h = floor(n/2): each partial result is a normal number
  // for every n in [-150, 127], so results reach denormals. y * 2^h adds h to y's exponent field (y is near 1,
  // so it stays normal): two integer ops, no multiply; floor (a shift) rather than n / 2 saves the sign fix-up.
  const int32_t ni = int32_t(n), h = ni >> 1;
  return as_float(as_bits(y) + (uint32_t(h) << 23)) * as_float(uint32_t(ni - h + 127) << 23);
}
// sigmoid(x) and 1 - sigmoid(x) = sigmoid(-x), both from e = exp(-|x|) <= 1: nothing overflows, 1 + e is
// in [1, 2] (so a reciprocal estimate stays accurate), and neither side cancels in its tail.
struct Sigmoid { float s, one_minus_s; };
inline Sigmoid vsigmoid(float x) {
  const float e = vexp(-std::fabs(x));
  const float r = 1.0f / (1.0f + e);
  const bool positive = x >= 0.f;
  return {positive ? r : e * r, positive ? e * r : r};
}
// erfc by a Chebyshev fit (Numerical Recipes' erfcc) with relative error below 1.2e-7 everywhere, so the
// tails keep their precision (1 + erf(x) would cancel for negative x).
inline float verfc(float x) {
  const float z = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.5f * z);
  const float r = t * vexp(-z * z - 1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f +
                  t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f +
                  t * (-0.82215223f + t * 0.17087277f)))))))));
  return x >= 0.f ? r : 2.0f - r;
}

// Runs body(begin, end) on contiguous ranges of [0, n), kParallelChunk elements each (whole cache lines) but the
// last, handed out dynamically: a thread that the OS deschedules on a busy machine holds back one chunk, not
// its static share of the work. Keeps the inner loop a plain `omp simd` loop the compiler vectorises.
constexpr int64_t kParallelChunk = 1 << 15;
template <class Body> inline void parallel_ranges(int64_t n, int threads, Body&& body) {
  const int64_t chunks = (n + kParallelChunk - 1) / kParallelChunk;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t i = 0; i < chunks; ++i) body(i * kParallelChunk, std::min(n, (i + 1) * kParallelChunk));
}

// Row kernels over bf16/fp16 storage (attention blocks, cross-entropy, dequantisation) widen a row's tile into an
// L1-resident fp32 buffer that several passes read. (The gated activations, one pass each, convert in registers:
// a tile's extra store and reload cost more than the conversion, measured in bench/README.md.)
constexpr int64_t kTile = 512;

template <class T> inline void widen(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = load(src[i]);
}
template <class T> inline void narrow(const float* src, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = store<T>(src[i]);
}

// ---- argument structs (plain pointers and sizes; Python validated them) ----
// Python fills them by field name (bindings.cpp); a field it leaves out is zero (a null pointer).
enum class Casting : int { llama, gemma, none };  // lf.kernels.rms_norm's `casting`

struct RmsNormFwd {
  const void* x; const void* w; void* y; float* rstd;
  int64_t rows, cols; float eps, offset; Casting casting; DType dtype; int threads;
};
struct RmsNormBwd {
  const void* dy; const void* x; const void* w; const float* rstd; void* dx; void* dw;  // dw may be null
  int64_t rows, cols; float offset; Casting casting; DType dtype; int threads;
};
// One tensor of layout (batch, heads, seq, head_dim) with a contiguous last dim and any other strides.
struct RopeTensor {
  const void* src; void* dst; int64_t heads; std::array<int64_t, 3> src_stride, dst_stride;
};
struct Rope {
  RopeTensor q, k; const void* cos; const void* sin; std::array<int64_t, 2> cs_stride;  // cos/sin: (batch, seq)
  int64_t batch, seq, dim; bool backward; DType dtype; int threads;
};
enum class GluKind : int { swiglu, geglu_tanh, geglu_erf };
struct GluFwd { const void* gate; const void* up; void* out; int64_t n; GluKind kind; DType dtype; int threads; };
struct GluBwd {
  const void* dy; const void* gate; const void* up; void* dgate; void* dup;
  int64_t n; GluKind kind; DType dtype; int threads;
};

// Rows of logits (contiguous, `vocab` wide) and their labels; grad may alias logits, or be null (loss only).
struct CrossEntropy {
  const void* logits; void* grad; const int64_t* labels; float* loss;
  int64_t rows, vocab, ignore_index; float smoothing, softcap, z_loss, grad_scale; DType dtype; int threads;
};

// A 2-D tile (rows x cols from (row0, col0)) of a bitsandbytes 4-bit weight of row length in_features, written
// contiguous to out in `dtype` after rounding to `weight_dtype` (quant_state.dtype). absmax is fp32, or uint8
// codes when nested (then code2[absmax] * absmax2[block / blocksize2] + offset).
struct Dequant4bit {
  const uint8_t* q; const void* absmax; const float* code; int64_t blocksize;
  bool nested; const float* absmax2; const float* code2; int64_t blocksize2; float offset;
  int64_t in_features, row0, col0, rows, cols; void* out; DType weight_dtype; DType dtype; int threads;
};

// One segment's causal score block of (rows = heads x n) x n, row r holding query r % n; T storage throughout.
// grad false: p = exp(s * scale - lse) on and below the diagonal, 0 above (the saved log-sum-exp makes it softmax).
// grad true: dp becomes dS = p * (dp - rowsum(o * dout)) * scale, in place (o, dout: rows x dim).
struct AttnBlock {
  const void* s; const float* lse; void* p; void* dp; const void* o; const void* dout;
  int64_t rows, n, dim; float scale; bool grad; DType dtype; int threads;
};

// A (batch, heads, seq, head_dim) tensor: its data and the strides (in elements) of batch, heads and seq; head_dim
// is contiguous.
struct HeadsTensor { void* data; std::array<int64_t, 3> stride; };
// Causal attention within packed segments, FlashAttention-2's scheme: segments holds (row, start, end) triples,
// nseg of them; query head h reads key/value head h / (heads / kv_heads). lse: (batch, heads, seq) fp32, the
// forward's log-sum-exp of the scaled scores, which the backward reads. backward false: q, k, v -> out, lse;
// true: q, k, v, out, dout, lse -> dq, dk, dv. Every position of every row must lie in one segment.
struct FlashAttention {
  HeadsTensor q, k, v, out, dout, dq, dk, dv; float* lse; const int64_t* segments;
  int64_t nseg, heads, kv_heads, seq, dim; float scale; bool backward; DType dtype; int threads;
};

// X(name, args struct): every kernel, declared once per instruction-set variant.
#define LF_KERNEL_LIST(X) \
  X(rms_norm_fwd, RmsNormFwd) X(rms_norm_bwd, RmsNormBwd) X(rope, Rope) X(glu_fwd, GluFwd) X(glu_bwd, GluBwd) \
  X(cross_entropy, CrossEntropy) X(dequant_4bit, Dequant4bit) \
  X(attn_block, AttnBlock) X(flash_attention, FlashAttention)

// Calls fn<T>() with T the storage type named by dtype.
template <template <class> class Fn, class Args>
inline void by_dtype(const Args& a) {
  switch (a.dtype) {
    case DType::float32: Fn<float>::run(a); break;
    case DType::bfloat16: Fn<bf16>::run(a); break;
    case DType::float16: Fn<f16>::run(a); break;
  }
}

}  // namespace lf

#ifdef LF_ISA
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#define LF_DECLARE(name, A) void name(const A&);
namespace lf { namespace LF_ISA {
LF_KERNEL_LIST(LF_DECLARE)

// Vector stores of fp32 lanes to T, rounding as store<T> does (nearest even; NaN stays NaN). In the variant's
// namespace: each is compiled for one instruction set only.
#if defined(__AVX512F__)
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void store16(f16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store16(bf16* dst, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}
#elif defined(__AVX2__)
inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
inline void store8(f16* dst, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8(bf16* dst, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  // NaN: |u| > inf as signed ints (|u| < 2^31)
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i bits = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}
#endif

}}  // namespace lf::LF_ISA
#undef LF_DECLARE
#endif
