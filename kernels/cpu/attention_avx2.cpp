// The CPU attention kernels built for avx2 (see fastattn/cpu_isa.h).
#include "isa_avx2.h"
#include "attention_kernel.h"
#include "isa_end.h"
