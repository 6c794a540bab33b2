// The CPU attention kernels built for default (see fastattn/cpu_isa.h).
#include "isa_default.h"
#include "attention_kernel.h"
#include "isa_end.h"
