#pragma once
#include <string>
#include "common.h"

namespace lf {

struct KernelTable {
  const char* isa;
#define LF_POINTER(name, A) void (*name)(const A&);
  LF_KERNEL_LIST(LF_POINTER)
#undef LF_POINTER
};

const KernelTable& kernels();           // the active variant
void set_isa(const std::string& isa);   // force a variant (throws if this CPU lacks it)
std::string available_isas();           // comma-separated, best first

}  // namespace lf
