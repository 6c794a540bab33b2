// The CPU softmax kernels built for default (see fastattn/cpu_isa.h).
#include "isa_default.h"
#include "softmax_kernel.h"
#include "isa_end.h"
