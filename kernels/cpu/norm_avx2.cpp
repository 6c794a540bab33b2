// The CPU LayerNorm/RMSNorm kernels built for avx2 (see fastattn/cpu_isa.h).
#include "isa_avx2.h"
#include "norm_kernel.h"
#include "isa_end.h"
