// Included first by every *_default.cpp: the portable build (at::vec's generic vectors).
#pragma once
#define CPU_CAPABILITY DEFAULT
#define FASTATTN_ISA generic
