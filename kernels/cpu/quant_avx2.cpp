// The CPU quantized-linear kernels built for avx2 (see fastattn/cpu_isa.h).
#include "isa_avx2.h"
#include "quant_kernel.h"
#include "isa_end.h"
