// The CPU decode attention kernel built for avx512 (see fastattn/cpu_isa.h).
#include "isa_avx512.h"
#include "decode_kernel.h"
#include "isa_end.h"
