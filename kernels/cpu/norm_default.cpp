// The CPU LayerNorm/RMSNorm kernels built for default (see fastattn/cpu_isa.h).
#include "isa_default.h"
#include "norm_kernel.h"
#include "isa_end.h"
