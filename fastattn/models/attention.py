"""Self- and cross-attention on fastattn.attention (packed tokens, GQA) and fastattn.KVCache."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import fastattn

from .packing import Packing


class SelfAttention(nn.Module):
    """Multi-head (GQA when n_kv_heads < n_heads) self-attention over packed tokens.

    forward(x (T, D), pk, rotary=None, cache=None) -> (T, D).
      No cache: fastattn.attention on the packed batch (cu_seqlens; causal for decoders).
      cache (a fastattn.KVCache of this layer) and pk.decode: one token per sequence,
        cache.attend(q, k_new, v_new) appends and attends (causal, bottom-right).
      cache and not pk.decode (prefill): the packed attention, then cache.append of the
        prompt's keys/values with their lengths.
    """

    def __init__(self, cfg, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.h, self.hkv, self.e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.h + 2 * self.hkv) * self.e, bias=cfg.bias)
        self.out = nn.Linear(self.h * self.e, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, pk: Packing, rotary=None, cache=None) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x).split([self.h * self.e, self.hkv * self.e, self.hkv * self.e], -1)
        q = q.view(T, self.h, self.e)  # (T, Hq, E)
        k = k.view(T, self.hkv, self.e)  # (T, Hkv, E)
        v = v.view(T, self.hkv, self.e)
        if rotary is not None:
            q, k = rotary(q, pk.positions), rotary(k, pk.positions)
        if cache is not None and pk.decode:
            o = cache.attend(q[:, None], k[:, None], v[:, None], causal=True)[:, 0]  # (B, Hq, E)
        else:
            o = fastattn.attention(q, k, v, causal=self.causal, cu_seqlens_q=pk.cu,
                                   cu_seqlens_k=pk.cu, max_seqlen_q=pk.max_len,
                                   max_seqlen_k=pk.max_len,
                                   dropout_p=self.dropout if self.training else 0.0)
            if cache is not None:
                cache.append(pk.pad(k), pk.pad(v), lengths=pk.lengths)
        return self.out(o.reshape(T, self.h * self.e))


@dataclasses.dataclass
class CrossKV:
    """One layer's cross-attention keys/values of the encoder output, computed once for
    generation: packed k, v (Ts, Hkv, E) and a KVCache holding them for decode steps."""

    k: torch.Tensor
    v: torch.Tensor
    cache: fastattn.KVCache


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder output (no mask beyond the sequence bounds).

    forward(x (Tq, D), pk_q, memory (Ts, D), pk_kv, kv=None) -> (Tq, D). With kv (CrossKV from
    precompute) the keys/values are not recomputed: decode steps use kv.cache.attend, other
    calls the packed attention on kv.k / kv.v.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        self.h, self.hkv, self.e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, self.h * self.e, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * self.hkv * self.e, bias=cfg.bias)
        self.out = nn.Linear(self.h * self.e, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return k.view(-1, self.hkv, self.e), v.view(-1, self.hkv, self.e)  # (Ts, Hkv, E)

    def precompute(self, memory: torch.Tensor, pk_kv: Packing) -> CrossKV:
        k, v = self.project_kv(memory)
        cache = fastattn.KVCache(pk_kv.batch_size, max(pk_kv.max_len, 1), self.hkv, self.e,
                                 dtype=k.dtype, device=k.device)
        kp, vp = pk_kv.pad(k), pk_kv.pad(v)
        cache.append(kp[:, : cache.capacity], vp[:, : cache.capacity], lengths=pk_kv.lengths)
        return CrossKV(k, v, cache)

    def forward(self, x: torch.Tensor, pk_q: Packing, memory: torch.Tensor | None,
                pk_kv: Packing, kv: CrossKV | None = None) -> torch.Tensor:
        T = x.shape[0]
        q = self.q(x).view(T, self.h, self.e)  # (Tq, Hq, E)
        if kv is not None and pk_q.decode:
            o = kv.cache.attend(q[:, None], causal=False)[:, 0]  # (B, Hq, E)
        else:
            k, v = (kv.k, kv.v) if kv is not None else self.project_kv(memory)
            o = fastattn.attention(q, k, v, causal=False, cu_seqlens_q=pk_q.cu,
                                   cu_seqlens_k=pk_kv.cu, max_seqlen_q=pk_q.max_len,
                                   max_seqlen_k=pk_kv.max_len,
                                   dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.reshape(T, self.h * self.e))
