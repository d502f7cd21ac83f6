// Causal attention over packed (varlen) segments on the CPU, forward and backward, fused: FlashAttention-2's
// scheme on 64 x 64 tiles of one segment. Key blocks wholly above the diagonal are never visited; the forward
// keeps a running max and sum per query row (online softmax) and saves the row's log-sum-exp, from which the
// backward recomputes each tile's probabilities. All sums are fp32: 16-bit inputs are widened once per
// (segment, kv head) into L2-sized buffers, outputs rounded on store; on AVX512-BF16 the bf16 score products
// (Q.K^T, dO.V^T) multiply stored bf16 pairs instead (vdpbf16ps: exact products, fp32 sums), 8-15% less time
// fwd+bwd than widened. One work item is a segment's kv head with
// its group of query heads, so every gradient of an item (dQ of its query heads, dK and dV) is its own: no
// atomics, no reduction across threads, and grouped-query attention reads K and V once per group.
#include <vector>
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

// The width of one vector register in floats: every product below is a rank-1 update of register rows.
#if defined(__AVX512F__)
constexpr int kW = 16;
#elif defined(__AVX2__)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif
typedef float vec __attribute__((vector_size(kW * sizeof(float))));
constexpr int64_t kB = 64;  // rows of a query block and of a key block

inline vec vload(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

// How a depth step of tile multiplies: F32, one fp32 product per lane; Bf16Pairs (AVX512-BF16), two bf16 products
// per lane in one instruction (vdpbf16ps; each product exact in fp32, summed in fp32), the operands bf16 pairs of
// consecutive depth steps packed in uint32.
struct F32 {
  using elem = float;
  static vec load(const float* p) { return vload(p); }
  static vec fma(vec acc, float w, vec m) { return acc + w * m; }
};
#if defined(__AVX512BF16__)
#define LF_BF16_PAIRS 1
struct Bf16Pairs {
  using elem = uint32_t;
  static __m512bh load(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static vec fma(vec acc, uint32_t w, __m512bh m) {
    return (vec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(int(w)), m);
  }
};
#else
#define LF_BF16_PAIRS 0
#endif

// C[r][0, NV * kW) (= or +=) sum_k W(r, k) * M[k][0, NV * kW) for r < R, with W(r, k) = w[r * wr + k * wk]: R x NV
// accumulators stay in registers over the whole k loop.
template <class Op, int R, int NV, bool Acc>
inline void tile(float* c, int64_t ldc, const typename Op::elem* w, int64_t wr, int64_t wk,
                 const typename Op::elem* m, int64_t ldm, int64_t depth) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Acc ? vload(c + r * ldc + v * kW) : vec{};
  for (int64_t k = 0; k < depth; ++k) {
    decltype(Op::load(m)) mk[NV];
    for (int v = 0; v < NV; ++v) mk[v] = Op::load(m + k * ldm + v * kW);
    for (int r = 0; r < R; ++r) {
      const auto x = w[r * wr + k * wk];
      for (int v = 0; v < NV; ++v) acc[r][v] = Op::fma(acc[r][v], x, mk[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * kW, acc[r][v]);
}

template <class Op, int R, bool Acc, class E>
inline void tile_cols(int nv, float* c, int64_t ldc, const E* w, int64_t wr, int64_t wk, const E* m, int64_t ldm,
                      int64_t depth) {
  switch (nv) {
    case 1: tile<Op, R, 1, Acc>(c, ldc, w, wr, wk, m, ldm, depth); break;
    case 2: tile<Op, R, 2, Acc>(c, ldc, w, wr, wk, m, ldm, depth); break;
    case 3: tile<Op, R, 3, Acc>(c, ldc, w, wr, wk, m, ldm, depth); break;
    default: tile<Op, R, 4, Acc>(c, ldc, w, wr, wk, m, ldm, depth); break;
  }
}

// C (rows x cols, cols a multiple of kW) = or += W (rows x depth, strided as in tile) . M (depth x cols).
template <bool Acc, class Op = F32, class E = typename Op::elem>
void gemm(float* c, int64_t ldc, int64_t rows, int64_t cols, const E* w, int64_t wr, int64_t wk, const E* m,
          int64_t ldm, int64_t depth) {
  for (int64_t j = 0; j < cols; j += 4 * kW) {
    const int nv = int(std::min<int64_t>(4, (cols - j) / kW));
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4)
      tile_cols<Op, 4, Acc>(nv, c + r * ldc + j, ldc, w + r * wr, wr, wk, m + j, ldm, depth);
    float* cr = c + r * ldc + j;
    const E* wrow = w + r * wr;
    switch (rows - r) {
      case 1: tile_cols<Op, 1, Acc>(nv, cr, ldc, wrow, wr, wk, m + j, ldm, depth); break;
      case 2: tile_cols<Op, 2, Acc>(nv, cr, ldc, wrow, wr, wk, m + j, ldm, depth); break;
      case 3: tile_cols<Op, 3, Acc>(nv, cr, ldc, wrow, wr, wk, m + j, ldm, depth); break;
      default: break;
    }
  }
}

// buf resized into consecutive pieces of the given sizes (floats).
template <size_t N> std::array<float*, N> carve(std::vector<float>& buf, const int64_t (&sizes)[N]) {
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  buf.resize(total);
  std::array<float*, N> out;
  float* at = buf.data();
  for (size_t i = 0; i < N; ++i) out[i] = at, at += sizes[i];
  return out;
}

// The score columns a tile computes for the key block from k0 of a segment of n: its keys rounded up to whole
// vectors (short segments' tiles are narrow; their padded keys are zeros, masked out).
inline int64_t key_cols(int64_t n, int64_t k0) { return std::min(kB, (n - k0 + kW - 1) / kW * kW); }

// One segment, one kv head: where its rows live in a HeadsTensor.
struct Seg {
  int64_t row, start, n;
  template <class T> T* at(const HeadsTensor& t, int64_t head, int64_t i) const {
    return static_cast<T*>(t.data) + row * t.stride[0] + head * t.stride[1] + (start + i) * t.stride[2];
  }
};

template <class T> struct Run {
  const FlashAttention& a;
  const int64_t dp;     // head_dim rounded up to 16: the fp32 buffers' row length, zero-padded
  const int64_t group;  // query heads per kv head

  // Rows [0, n) of (seg, head) widened (times scale) into dst (np x dp), zeros past dim and past n.
  void rows_in(const HeadsTensor& t, const Seg& s, int64_t head, int64_t np, float scale, float* dst) const {
    for (int64_t i = 0; i < np; ++i) {
      float* d = dst + i * dp;
      if (i < s.n) {
        const T* src = s.at<const T>(t, head, i);
        for (int64_t c = 0; c < a.dim; ++c) d[c] = load(src[c]) * scale;
        std::fill(d + a.dim, d + dp, 0.f);
      } else {
        std::fill(d, d + dp, 0.f);
      }
    }
  }
  // The same rows transposed: dst (dp x np).
  void cols_in(const HeadsTensor& t, const Seg& s, int64_t head, int64_t np, float* dst) const {
    std::fill(dst, dst + dp * np, 0.f);
    for (int64_t i = 0; i < s.n; ++i) {
      const T* src = s.at<const T>(t, head, i);
      for (int64_t c = 0; c < a.dim; ++c) dst[c * np + i] = load(src[c]);
    }
  }
  void rows_out(const float* src, int64_t n, float scale, const HeadsTensor& t, const Seg& s, int64_t head) const {
    for (int64_t i = 0; i < n; ++i) {
      T* d = s.at<T>(t, head, i);
      const float* x = src + i * dp;
#pragma omp simd
      for (int64_t c = 0; c < a.dim; ++c) d[c] = store<T>(x[c] * scale);
    }
  }
  // bf16 on AVX512-BF16: the two score products (Q.K^T, dO.V^T) multiply bf16 pairs as stored.
  static constexpr bool kPairs = LF_BF16_PAIRS && std::is_same_v<T, bf16>;
  int64_t dot_dp() const { return kPairs ? dp / 2 : dp; }  // a score operand's row in 4-byte units

  // A score product's left rows: rows_in's fp32 rows (times scale), or (kPairs) bf16 pairs as stored, unscaled.
  void dot_rows_in(const HeadsTensor& t, const Seg& s, int64_t head, int64_t np, float scale, float* dst) const {
    if constexpr (kPairs) {
      uint16_t* d = reinterpret_cast<uint16_t*>(dst);
      std::fill(d, d + np * dp, uint16_t(0));
      for (int64_t i = 0; i < s.n; ++i) std::memcpy(d + i * dp, s.at<const T>(t, head, i), a.dim * sizeof(T));
    } else {
      rows_in(t, s, head, np, scale, dst);
    }
  }
  // Its right operand, transposed: cols_in's (dp x np) fp32, or (kPairs) (dp / 2 x np) bf16 pairs.
  void dot_cols_in(const HeadsTensor& t, const Seg& s, int64_t head, int64_t np, float* dst) const {
    if constexpr (kPairs) {
      uint32_t* d = reinterpret_cast<uint32_t*>(dst);
      std::fill(d, d + dp / 2 * np, 0u);
      for (int64_t i = 0; i < s.n; ++i) {
        const T* src = s.at<const T>(t, head, i);
        for (int64_t c = 0; c < a.dim; ++c) d[c / 2 * np + i] |= uint32_t(src[c].bits) << (16 * (c % 2));
      }
    } else {
      cols_in(t, s, head, np, dst);
    }
  }
  // S (r x cols, row stride kB) = left rows . right columns; the pairs' products times pairs_scale (fp32 left
  // rows come scaled).
  void dot(float* sc, int64_t r, int64_t cols, const float* left, const float* right, int64_t np,
           float pairs_scale) const {
#if LF_BF16_PAIRS
    if constexpr (kPairs) {
      gemm<false, Bf16Pairs>(sc, kB, r, cols, reinterpret_cast<const uint32_t*>(left), dp / 2, 1,
                             reinterpret_cast<const uint32_t*>(right), np, dp / 2);
      for (int64_t i = 0; i < r && pairs_scale != 1.f; ++i) {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) sc[i * kB + j] *= pairs_scale;
      }
      return;
    }
#endif
    gemm<false>(sc, kB, r, cols, left, dp, 1, right, np, dp);
  }

  float* lse_at(const Seg& s, int64_t head) const { return a.lse + (s.row * a.heads + head) * a.seq + s.start; }

  // Forward of one query block (rows i0 .. i0 + r of the segment): scores against every key block up to the
  // diagonal, online softmax, P.V accumulated in acc; then out = acc / sum and lse = max + log(sum).
  void forward_block(const Seg& s, int64_t head, int64_t i0, int64_t r, const float* q, const float* kt,
                     const float* v, int64_t np, float* sc, float* acc, float* mx, float* sum) const {
    const int64_t qb = i0 / kB;
    std::fill(mx, mx + r, -INFINITY);
    std::fill(sum, sum + r, 0.f);
    std::fill(acc, acc + r * dp, 0.f);
    for (int64_t kb = 0; kb <= qb; ++kb) {
      const int64_t cols = key_cols(s.n, kb * kB);
      dot(sc, r, cols, q, kt + kb * kB, np, a.scale);
      for (int64_t i = 0; i < r; ++i) {
        float* si = sc + i * kB;
        const int64_t kn = kb == qb ? i + 1 : kB;  // the diagonal block: keys up to the query itself
        float m = mx[i];
        for (int64_t j = 0; j < kn; ++j) m = std::max(m, si[j]);
        const float alpha = mx[i] == -INFINITY ? 0.f : vexp(mx[i] - m);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < kn; ++j) {
          si[j] = vexp(si[j] - m);
          total += si[j];
        }
        std::fill(si + kn, si + cols, 0.f);
        mx[i] = m;
        sum[i] = sum[i] * alpha + total;
        float* ai = acc + i * dp;
        if (alpha != 1.f) {
#pragma omp simd
          for (int64_t c = 0; c < dp; ++c) ai[c] *= alpha;
        }
      }
      gemm<true>(acc, dp, r, dp, sc, kB, 1, v + kb * kB * dp, dp, cols);
    }
    float* lse = lse_at(s, head) + i0;
    for (int64_t i = 0; i < r; ++i) {
      const float inv = 1.f / sum[i];
      float* ai = acc + i * dp;
#pragma omp simd
      for (int64_t c = 0; c < dp; ++c) ai[c] *= inv;
      lse[i] = mx[i] + std::log(sum[i]);
    }
    Seg block{s.row, s.start + i0, r};
    rows_out(acc, r, 1.f, a.out, block, head);
  }

  void forward(const Seg& s, int64_t kvh, std::vector<float>& buf) const {
    const int64_t np = (s.n + kB - 1) / kB * kB;
    const auto [kt, v, q, acc, sc, mx, sum] = carve(buf, {np * dp, np * dp, kB * dp, kB * dp, kB * kB, kB, kB});
    dot_cols_in(a.k, s, kvh, np, kt);
    rows_in(a.v, s, kvh, np, 1.f, v);
    for (int64_t head = kvh * group; head < (kvh + 1) * group; ++head)
      for (int64_t i0 = 0; i0 < s.n; i0 += kB) {
        const int64_t r = std::min(kB, s.n - i0);
        dot_rows_in(a.q, Seg{s.row, s.start + i0, r}, head, r, a.scale, q);
        forward_block(s, head, i0, r, q, kt, v, np, sc, acc, mx, sum);
      }
  }

  // Backward of one (segment, kv head): for each key block, every query block on or below the diagonal of
  // each query head of the group: P = exp(S - lse), dS = P * (dO.V^T - delta), then dV += P^T.dO,
  // dK += dS^T.(scale Q), dQ += dS.K (times scale on store).
  void backward(const Seg& s, int64_t kvh, std::vector<float>& buf) const {
    const int64_t np = (s.n + kB - 1) / kB * kB, g = group;
    const int64_t seg = np * dp, heads = g * np * dp, pairs = kPairs ? heads / 2 : 0;
    const auto [kk, kt, vt, dk, dv, q, dout, dq, lse, delta, p, ds, q_pairs, dout_pairs] =
        carve(buf, {seg, seg, seg, seg, seg, heads, heads, heads, g * np, g * np, kB * kB, kB * kB, pairs, pairs});
    const float* q_dot = kPairs ? q_pairs : q;  // the score products' left rows
    const float* dout_dot = kPairs ? dout_pairs : dout;
    rows_in(a.k, s, kvh, np, 1.f, kk);
    dot_cols_in(a.k, s, kvh, np, kt);
    dot_cols_in(a.v, s, kvh, np, vt);
    std::fill(dk, dk + 2 * seg, 0.f);  // dk and dv
    std::fill(dq, dq + g * np * dp, 0.f);
    for (int64_t h = 0; h < g; ++h) {
      const int64_t head = kvh * g + h;
      rows_in(a.q, s, head, np, a.scale, q + h * np * dp);
      rows_in(a.dout, s, head, np, 1.f, dout + h * np * dp);
      if (kPairs) {
        dot_rows_in(a.q, s, head, np, 1.f, q_pairs + h * pairs / g);
        dot_rows_in(a.dout, s, head, np, 1.f, dout_pairs + h * pairs / g);
      }
      const float* saved = lse_at(s, head);
      for (int64_t i = 0; i < s.n; ++i) {
        const T* o = s.at<const T>(a.out, head, i);
        const float* d = dout + (h * np + i) * dp;
        float dot = 0.f;  // rowsum(O * dO) = rowsum(P * dP): softmax's backward shift
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < a.dim; ++c) dot += load(o[c]) * d[c];
        delta[h * np + i] = dot;
        lse[h * np + i] = saved[i];
      }
    }
    for (int64_t k0 = 0; k0 < s.n; k0 += kB) {
      const int64_t kn = std::min(kB, s.n - k0), cols = key_cols(s.n, k0);
      for (int64_t h = 0; h < g; ++h)
        for (int64_t i0 = k0; i0 < s.n; i0 += kB) {
          const int64_t r = std::min(kB, s.n - i0), row = h * np + i0;
          const float* qh = q + row * dp;
          const float* dh = dout + row * dp;
          dot(p, r, cols, q_dot + row * dot_dp(), kt + k0, np, a.scale);
          dot(ds, r, cols, dout_dot + row * dot_dp(), vt + k0, np, 1.f);
          for (int64_t i = 0; i < r; ++i) {
            float* pi = p + i * kB;
            float* di = ds + i * kB;
            const int64_t len = i0 == k0 ? i + 1 : kn;
            const float shift = lse[row + i], dlt = delta[row + i];
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              pi[j] = vexp(pi[j] - shift);
              di[j] = pi[j] * (di[j] - dlt);
            }
            std::fill(pi + len, pi + cols, 0.f);
            std::fill(di + len, di + cols, 0.f);
          }
          gemm<true>(dv + k0 * dp, dp, kn, dp, p, 1, kB, dh, dp, r);
          gemm<true>(dk + k0 * dp, dp, kn, dp, ds, 1, kB, qh, dp, r);
          gemm<true>(dq + row * dp, dp, r, dp, ds, kB, 1, kk + k0 * dp, dp, kn);
        }
    }
    rows_out(dk, s.n, 1.f, a.dk, s, kvh);
    rows_out(dv, s.n, 1.f, a.dv, s, kvh);
    for (int64_t h = 0; h < g; ++h) rows_out(dq + h * np * dp, s.n, a.scale, a.dq, s, kvh * g + h);
  }

  static void run(const FlashAttention& a) {
    const Run self{a, (a.dim + 15) / 16 * 16, a.heads / a.kv_heads};
    // Work items (segment, kv head), longest segments first: their cost grows as n^2, so dynamic scheduling
    // from the largest down keeps both threads busy to the end.
    std::vector<int64_t> order(a.nseg);
    for (int64_t i = 0; i < a.nseg; ++i) order[i] = i;
    auto len = [&](int64_t i) { return a.segments[3 * i + 2] - a.segments[3 * i + 1]; };
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return len(x) > len(y); });
    const int64_t items = a.nseg * a.kv_heads;
    // Small batches run on one thread: a parallel region costs more than their work, and far more when another
    // process holds a core (a thread waits for a scheduler tick).
    int64_t work = 0;  // multiply-adds of the causal halves, about
    for (int64_t i = 0; i < a.nseg; ++i) work += len(i) * len(i) / 2 * a.heads * self.dp;
    const int threads = work < (int64_t(1) << 22) ? 1 : int(std::min<int64_t>(a.threads, items));
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t* t = a.segments + 3 * order[it / a.kv_heads];
        const Seg s{t[0], t[1], t[2] - t[1]};
        if (a.backward) self.backward(s, it % a.kv_heads, buf);
        else self.forward(s, it % a.kv_heads, buf);
      }
    }
  }
};

}  // namespace

void flash_attention(const FlashAttention& a) { by_dtype<Run>(a); }

}}  // namespace lf::LF_ISA
