// Included last by every per-ISA file (closes the clang attribute region of isa_<isa>.h).
#if defined(__clang__) && (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2))
#pragma clang attribute pop
#endif
