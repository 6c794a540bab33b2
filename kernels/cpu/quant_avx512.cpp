// The CPU quantized-linear kernels built for avx512 (see fastattn/cpu_isa.h).
#include "isa_avx512.h"
#include "quant_kernel.h"
#include "isa_end.h"
