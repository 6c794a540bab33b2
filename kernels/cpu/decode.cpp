// fastattn::decode_attention for CPU tensors: checks, split plan and allocation
// (fastattn/decode_host.h), then the kernel built for the widest ISA this CPU has
// (kernels/cpu/decode_kernel.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "decode_cpu.h"
#include "fastattn/cpu_isa.h"
#include "fastattn/decode_host.h"

namespace fastattn::cpu {
namespace {

// Splits: enough (b, kv head, split) tasks for twice the threads (dynamic scheduling evens out
// different sequence lengths), each split at least 256 keys (a split's fixed cost: packing its
// queries, the softmax bookkeeping and the workspace round trip).
constexpr int64_t kMinSplit = 256;

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& alibi_slopes, double scale, int64_t window_left,
    int64_t window_right, double softcap, int64_t max_seqlen, int64_t num_splits) {
  const DecodeInputs in = prepare_decode(q, k_cache, v_cache, cache_seqlens, block_table,
                                         alibi_slopes, scale, window_left, window_right, softcap,
                                         max_seqlen, num_splits, 2 * at::get_num_threads(),
                                         kMinSplit);
  switch (cpu_isa()) {
    case Isa::Avx512: avx512::decode_attention(in.a); break;
    case Isa::Avx2: avx2::decode_attention(in.a); break;
    default: generic::decode_attention(in.a); break;
  }
  return {in.out, in.lse};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("decode_attention", &fastattn::cpu::decode_attention_cpu);
}
