// The CPU quantized-linear kernels built for default (see fastattn/cpu_isa.h).
#include "isa_default.h"
#include "quant_kernel.h"
#include "isa_end.h"
