// Gated activations act(gate) * up on the CPU: SwiGLU (SiLU) and GeGLU (GELU, tanh or erf).
// The backward pass recomputes the activation from gate instead of reading a saved copy. One pass over the
// elements, 16-bit storage converted in registers: through L1 tiles (common.h's widen/narrow) bf16 took 1.3-1.5x
// fp32's CPU time per element, in one loop it takes about fp32's (bench/README.md, "SwiGLU in bf16").
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// act(g), and with Grad its derivative too.
struct Act { float a, da; };
template <GluKind Kind, bool Grad> inline Act act(float g) {
  if (Kind == GluKind::swiglu) {
    const Sigmoid sg = vsigmoid(g);
    return {g * sg.s, Grad ? sg.s * (1.0f + g * sg.one_minus_s) : 0.f};
  } else if (Kind == GluKind::geglu_tanh) {
    // 0.5 g (1 + tanh(z)) = g sigmoid(2z): no cancellation where tanh(z) nears -1
    const float z2 = 2.0f * kSqrt2OverPi * (g + kGeluCubic * g * g * g);
    const Sigmoid sg = vsigmoid(z2);
    return {g * sg.s,
            Grad ? sg.s + g * sg.s * sg.one_minus_s * 2.0f * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * g * g) : 0.f};
  } else {
    const float cdf = 0.5f * verfc(-g * kInvSqrt2);  // Phi(g), accurate in both tails
    return {g * cdf, Grad ? cdf + g * kInvSqrt2Pi * vexp(-0.5f * g * g) : 0.f};
  }
}

template <class T, GluKind Kind> void fwd(const GluFwd& p) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  parallel_ranges(p.n, p.threads, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] = store<T>(act<Kind, false>(load(gate[i])).a * load(up[i]));
  });
}

template <class T, GluKind Kind> void bwd(const GluBwd& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
  parallel_ranges(p.n, p.threads, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float d = load(dy[i]);
      const Act f = act<Kind, true>(load(gate[i]));
      dgate[i] = store<T>(d * load(up[i]) * f.da);
      dup[i] = store<T>(d * f.a);
    }
  });
}

template <class T> struct Fwd {
  static void run(const GluFwd& p) {
    if (p.kind == GluKind::swiglu) fwd<T, GluKind::swiglu>(p);
    else if (p.kind == GluKind::geglu_tanh) fwd<T, GluKind::geglu_tanh>(p);
    else fwd<T, GluKind::geglu_erf>(p);
  }
};
template <class T> struct Bwd {
  static void run(const GluBwd& p) {
    if (p.kind == GluKind::swiglu) bwd<T, GluKind::swiglu>(p);
    else if (p.kind == GluKind::geglu_tanh) bwd<T, GluKind::geglu_tanh>(p);
    else bwd<T, GluKind::geglu_erf>(p);
  }
};

}  // namespace

void glu_fwd(const GluFwd& p) { by_dtype<Fwd>(p); }
void glu_bwd(const GluBwd& p) { by_dtype<Bwd>(p); }

}}  // namespace lf::LF_ISA
