// Picks, once per process, the best compiled variant of the kernels for the running CPU.
// LF_CPU_ISA=generic|avx2|avx512|avx512bf16 (or lf._C.set_isa) forces one, e.g. to test every variant.
#include <cstdlib>
#include <stdexcept>
#include <string>
#include "dispatch.h"

#define LF_DECLARE(name, A) void name(const A&);
namespace lf {
namespace generic { LF_KERNEL_LIST(LF_DECLARE) }
#ifdef LF_HAS_avx2
namespace avx2 { LF_KERNEL_LIST(LF_DECLARE) }
#endif
#ifdef LF_HAS_avx512
namespace avx512 { LF_KERNEL_LIST(LF_DECLARE) }
#endif
#ifdef LF_HAS_avx512bf16
namespace avx512bf16 { LF_KERNEL_LIST(LF_DECLARE) }
#endif
}  // namespace lf
#undef LF_DECLARE

namespace lf {
namespace {

#define LF_ENTRY(name, A) &LF_NS::name,
#define LF_NS generic
const KernelTable kGeneric{"generic", LF_KERNEL_LIST(LF_ENTRY)};
#undef LF_NS
#ifdef LF_HAS_avx2
#define LF_NS avx2
const KernelTable kAvx2{"avx2", LF_KERNEL_LIST(LF_ENTRY)};
#undef LF_NS
#endif
#ifdef LF_HAS_avx512
#define LF_NS avx512
const KernelTable kAvx512{"avx512", LF_KERNEL_LIST(LF_ENTRY)};
#undef LF_NS
#endif
#ifdef LF_HAS_avx512bf16
#define LF_NS avx512bf16
const KernelTable kAvx512Bf16{"avx512bf16", LF_KERNEL_LIST(LF_ENTRY)};
#undef LF_NS
#endif
#undef LF_ENTRY

bool cpu_has(const std::string& isa) {
  if (isa == "generic") return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#ifdef LF_HAS_avx2
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#ifdef LF_HAS_avx512
  // Skylake-X, Cascade Lake, Ice Lake: AVX-512 without bf16 dot products
  if (isa == "avx512")
    return cpu_has("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#ifdef LF_HAS_avx512bf16
  // Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later
  if (isa == "avx512bf16") return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
#endif
#endif
  return false;
}

const KernelTable* table_for(const std::string& isa) {
  if (!cpu_has(isa)) return nullptr;
  if (isa == "generic") return &kGeneric;
#ifdef LF_HAS_avx2
  if (isa == "avx2") return &kAvx2;
#endif
#ifdef LF_HAS_avx512
  if (isa == "avx512") return &kAvx512;
#endif
#ifdef LF_HAS_avx512bf16
  if (isa == "avx512bf16") return &kAvx512Bf16;
#endif
  return nullptr;
}

constexpr const char* kBestFirst[] = {"avx512bf16", "avx512", "avx2", "generic"};

const KernelTable* best() {
  if (const char* forced = std::getenv("LF_CPU_ISA")) {
    if (const KernelTable* t = table_for(forced)) return t;
    throw std::runtime_error(std::string("LF_CPU_ISA=") + forced +
                             " is not available on this CPU or build; use one of: " + available_isas());
  }
  for (const char* isa : kBestFirst)
    if (const KernelTable* t = table_for(isa)) return t;
  return &kGeneric;
}

const KernelTable* g_active = nullptr;

}  // namespace

std::string available_isas() {
  std::string out;
  for (const char* isa : kBestFirst)
    if (table_for(isa)) out += (out.empty() ? "" : ", ") + std::string(isa);
  return out;
}

const KernelTable& kernels() {
  if (!g_active) g_active = best();
  return *g_active;
}

void set_isa(const std::string& isa) {
  const KernelTable* t = table_for(isa);
  if (!t) throw std::invalid_argument("CPU kernel variant '" + isa + "' is not available here; use one of: " + available_isas());
  g_active = t;
}

}  // namespace lf
