#include "fastattn/cpu_isa.h"

#include <ATen/Version.h>

#include <cstdlib>
#include <cstring>

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

bool cpu_has_avx512_vnni() {
  static const bool vnni = [] {
    if (cpu_isa() != Isa::Avx512) return false;
    const char* off = std::getenv("FASTATTN_NO_VNNI");
    if (off && std::strcmp(off, "0") != 0 && off[0] != '\0') return false;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    return __builtin_cpu_supports("avx512vnni") != 0;
#else
    return false;
#endif
  }();
  return vnni;
}

}  // namespace fastattn::cpu
