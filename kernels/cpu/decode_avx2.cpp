// The CPU decode attention kernel built for avx2 (see fastattn/cpu_isa.h).
#include "isa_avx2.h"
#include "decode_kernel.h"
#include "isa_end.h"
