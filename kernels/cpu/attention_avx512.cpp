// The CPU attention kernels built for avx512 (see fastattn/cpu_isa.h).
#include "isa_avx512.h"
#include "attention_kernel.h"
#include "isa_end.h"
