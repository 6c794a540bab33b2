// Included first by every *_avx2.cpp: compile what follows for AVX2 + FMA and tell at::vec.
#pragma once
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx,avx2,fma,f16c")
#endif
// GCC's target pragma enables the instructions but not the feature macros that
// at::vec and Sleef test, so define those as -mavx2 -mfma -mf16c would.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#define FASTATTN_ISA avx2
