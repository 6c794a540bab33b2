// CPU kernels are compiled once per instruction set (kernels/cpu/<op>_<isa>.cpp): at::vec
// picks its vector width at compile time from CPU_CAPABILITY, so one build serves an AVX-512
// machine at full width and still runs on an AVX2-only or older x86 CPU. Each ISA file
// defines FASTATTN_ISA and includes the op's kernel header, whose entry points live in
// fastattn::cpu::<isa>. cpu_isa() picks the widest one the running CPU supports (it honours
// torch's ATEN_CPU_CAPABILITY override, which makes the fallbacks testable).
#pragma once

namespace fastattn::cpu {

enum class Isa { Default, Avx2, Avx512 };

Isa cpu_isa();  // defined in kernels/cpu/isa.cpp

// Whether the avx512 kernels may use AVX-512 VNNI (vpdpbusd): cpu_isa() is Avx512 and the
// running CPU has avx512vnni. FASTATTN_NO_VNNI=1 turns it off (tests of the fallback).
bool cpu_has_avx512_vnni();  // defined in kernels/cpu/isa.cpp

}  // namespace fastattn::cpu
