// Dequantisation of a bitsandbytes 4-bit (NF4/FP4) weight, one 2-D tile at a time, for lora_nf4_linear's CPU
// backend: lf/kernels/lora_nf4_linear.py multiplies each tile with BLAS while it is still in cache, so the
// full-precision weight never exists. Bit for bit bitsandbytes' values: code[nibble] * absmax in fp32, rounded
// once to the weight's dtype. Built with -ffp-contract=off: the nested absmax is a product and a sum rounded
// separately, as bitsandbytes computes it, and must not become one FMA.
#include "common.h"

namespace lf {
namespace LF_ISA {
namespace {

float block_absmax(const Dequant4bit& a, int64_t block) {
  if (!a.nested) return static_cast<const float*>(a.absmax)[block];
  const uint8_t idx = static_cast<const uint8_t*>(a.absmax)[block];
  const float scaled = a.code2[idx] * a.absmax2[block / a.blocksize2];
  return scaled + a.offset;
}

// n_bytes whole bytes (2 values each, high nibble first) times one absmax, into dst.
template <class T> inline void dequant_bytes(const uint8_t* p, int64_t n_bytes, const float* code, float am, T* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  // The 16-entry table fits one register: permutexvar looks 16 codes up at once.
  const __m512 table = _mm512_loadu_ps(code), scale = _mm512_set1_ps(am);
  const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (; i + 16 <= n_bytes; i += 16) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale);
    const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), table),
                                    scale);
    store16(dst + 2 * i, _mm512_permutex2var_ps(hi, even, lo));
    store16(dst + 2 * i + 16, _mm512_permutex2var_ps(hi, odd, lo));
  }
#elif defined(__AVX2__)
  // Two 8-entry lookups, the nibble's bit 3 picking between them.
  const __m256 low_half = _mm256_loadu_ps(code), high_half = _mm256_loadu_ps(code + 8), scale = _mm256_set1_ps(am);
  auto lookup = [&](__m256i idx) {
    const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(low_half, idx),
                                          _mm256_permutevar8x32_ps(high_half, idx), pick), scale);
  };
  for (; i + 8 <= n_bytes; i += 8) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i)));
    const __m256 hi = lookup(_mm256_srli_epi32(bytes, 4));
    const __m256 lo = lookup(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
    const __m256 a = _mm256_unpacklo_ps(hi, lo), b = _mm256_unpackhi_ps(hi, lo);  // pairs, per 128-bit lane
    store8(dst + 2 * i, _mm256_permute2f128_ps(a, b, 0x20));
    store8(dst + 2 * i + 8, _mm256_permute2f128_ps(a, b, 0x31));
  }
#endif
  for (; i < n_bytes; ++i) {
    dst[2 * i] = store<T>(code[p[i] >> 4] * am);
    dst[2 * i + 1] = store<T>(code[p[i] & 15] * am);
  }
}

// Flat elements [begin, end) of the weight into dst, block by block, each value rounded once to T.
template <class T> void dequant_range(const Dequant4bit& a, int64_t begin, int64_t end, T* dst) {
  const uint8_t* q = a.q;
  for (int64_t e = begin; e < end;) {
    const int64_t block = e / a.blocksize, stop = std::min(end, (block + 1) * a.blocksize);
    const float am = block_absmax(a, block);
    if (e & 1) { *dst++ = store<T>(a.code[q[e >> 1] & 15] * am); ++e; }  // a range may start on a low nibble
    const int64_t n_bytes = (stop - e) / 2;
    dequant_bytes(q + (e >> 1), n_bytes, a.code, am, dst);
    dst += 2 * n_bytes;
    e += 2 * n_bytes;
    if (e < stop) { *dst++ = store<T>(a.code[q[e >> 1] >> 4] * am); ++e; }
  }
}

// Rounds to the weight's 16-bit dtype, in place (then the store to the tile's other dtype rounds again).
void round_weight(float* v, int64_t n, DType weight) {
  if (weight == DType::bfloat16) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) v[i] = round_to<bf16>(v[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) v[i] = round_to<f16>(v[i]);
  }
}

template <class T> struct Dequant {
  static void run(const Dequant4bit& a) {
    // bitsandbytes rounds the fp32 product once, to the weight's dtype; the caller may want the tile in another
    // dtype. Straight into T when the weight is T or fp32 (one rounding either way), else through an fp32
    // buffer rounded to the weight's dtype first.
    const bool direct = a.weight_dtype == a.dtype || a.weight_dtype == DType::float32;
#pragma omp parallel for num_threads(a.threads) schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const int64_t first = (a.row0 + r) * a.in_features + a.col0;
      T* out = static_cast<T*>(a.out) + r * a.cols;
      if (direct) {
        dequant_range(a, first, first + a.cols, out);
        continue;
      }
      alignas(64) float buf[kTile];
      for (int64_t c = 0; c < a.cols; c += kTile) {
        const int64_t len = std::min(kTile, a.cols - c);
        dequant_range(a, first + c, first + c + len, buf);
        round_weight(buf, len, a.weight_dtype);
        narrow(buf, out + c, len);
      }
    }
  }
};

}  // namespace

void dequant_4bit(const Dequant4bit& a) { by_dtype<Dequant>(a); }

}  // namespace LF_ISA
}  // namespace lf
