// The CPU softmax kernels built for avx2 (see fastattn/cpu_isa.h).
#include "isa_avx2.h"
#include "softmax_kernel.h"
#include "isa_end.h"
