// Gated activations act(gate) * up on the CPU: SwiGLU (SiLU) and GeGLU (GELU, tanh or erf).
// The backward pass recomputes the activation from gate instead of reading a saved copy.
#include "common.h"

namespace lf { namespace LF_ISA {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// act(g) and d act / d g for each kind.
template <int Kind> inline void act(float g, float& a, float& da) {
  if (Kind == kSwiGLU) {
    const float sg = vsigmoid(g);
    a = g * sg;
    da = sg * (1.0f + g * (1.0f - sg));
  } else if (Kind == kGeGLUTanh) {
    const float inner = kSqrt2OverPi * (g + kGeluCubic * g * g * g);
    const float t = vtanh(inner);
    a = 0.5f * g * (1.0f + t);
    da = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * g * g);
  } else {
    const float cdf = 0.5f * (1.0f + verf(g * kInvSqrt2));
    a = g * cdf;
    da = cdf + g * kInvSqrt2Pi * vexp(-0.5f * g * g);
  }
}

template <class T, int Kind> void fwd(const GluFwd& p) {
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
#pragma omp parallel for simd schedule(static) num_threads(p.threads)
  for (int64_t i = 0; i < p.n; ++i) {
    float a, da;
    act<Kind>(load(gate[i]), a, da);
    out[i] = store<T>(a * load(up[i]));
  }
}

template <class T, int Kind> void bwd(const GluBwd& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* dgate = static_cast<T*>(p.dgate);
  T* dup = static_cast<T*>(p.dup);
#pragma omp parallel for simd schedule(static) num_threads(p.threads)
  for (int64_t i = 0; i < p.n; ++i) {
    float a, da;
    act<Kind>(load(gate[i]), a, da);
    const float d = load(dy[i]);
    dgate[i] = store<T>(d * load(up[i]) * da);
    dup[i] = store<T>(d * a);
  }
}

template <class T> struct Fwd {
  static void run(const GluFwd& p) {
    if (p.kind == kSwiGLU) fwd<T, kSwiGLU>(p);
    else if (p.kind == kGeGLUTanh) fwd<T, kGeGLUTanh>(p);
    else fwd<T, kGeGLUErf>(p);
  }
};
template <class T> struct Bwd {
  static void run(const GluBwd& p) {
    if (p.kind == kSwiGLU) bwd<T, kSwiGLU>(p);
    else if (p.kind == kGeGLUTanh) bwd<T, kGeGLUTanh>(p);
    else bwd<T, kGeGLUErf>(p);
  }
};

}  // namespace

void glu_fwd(const GluFwd& p) { by_dtype<Fwd>(p); }
void glu_bwd(const GluBwd& p) { by_dtype<Bwd>(p); }

}}  // namespace lf::LF_ISA
