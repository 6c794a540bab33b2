#include "fastattn/cpu_isa.h"

#include <ATen/Version.h>

namespace fastattn::cpu {

Isa cpu_isa() {
  // torch's own choice for this CPU ("AVX512", "AVX2", "DEFAULT", ...), which honours the
  // ATEN_CPU_CAPABILITY environment override; read once.
  static const Isa isa = [] {
#if defined(__x86_64__) || defined(_M_X64)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::Avx512;
    if (cap == "AVX2") return Isa::Avx2;
#endif
    return Isa::Default;
  }();
  return isa;
}

}  // namespace fastattn::cpu
