// The CPU decode attention kernel built for default (see fastattn/cpu_isa.h).
#include "isa_default.h"
#include "decode_kernel.h"
#include "isa_end.h"
