"""The unified Show-o transformer: Phi-1.5 with per-head QK-LayerNorm (official
`models/phi.py`: `PhiForCausalLM`, `PhiAttention.forward`, `PhiDecoderLayer`).

    x0 = E[ids] (or caller-supplied embeddings)
    per layer:  h = LN(x);  x = x + Attn(h) + MLP(h)          (parallel residual, one shared LN)
    Attn: q,k,v projections → per-head LayerNorm(64) on q and k → rotate-half RoPE on the first
          32 dims (positions 0..L-1, offset by the cache) → softmax(q·kᵀ/8 + mask)·v → dense
    logits = lm_head(LN_final(x))                               (untied head with bias)

Caches follow mlx-lm's interface (`offset`, `update_and_fetch(keys, values)`), so mlx-lm's
`KVCache` serves text decoding and `PrefixCache` serves MaskGIT steps over a fixed text prefix.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .attention import scaled_dot_product_attention
from .config import ShowoConfig


class PrefixCache:
    """Keys/values of a fixed prefix (e.g. the 129-token t2i text block) reused by many forwards.

    `update_and_fetch` returns prefix + new keys without storing the new ones, so every MaskGIT
    step sees the same prefix; RoPE positions of the new tokens start after the prefix."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values

    @property
    def offset(self) -> int:
        return self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys, self.values

    @staticmethod
    def concat_batch(caches: Sequence[Sequence["PrefixCache"]]) -> list["PrefixCache"]:
        """Stack per-layer caches of several row groups (e.g. cond rows then uncond rows)."""
        return [
            PrefixCache(
                mx.concatenate([c[i].keys for c in caches], axis=0),
                mx.concatenate([c[i].values for c in caches], axis=0),
            )
            for i in range(len(caches[0]))
        ]

    def repeat(self, n: int) -> "PrefixCache":
        """The same prefix for n rows (the unconditional prefix is shared by every row)."""
        return PrefixCache(mx.repeat(self.keys, n, axis=0), mx.repeat(self.values, n, axis=0))


class RecordingCache:
    """Stores the keys/values a forward produces so they can become a `PrefixCache`."""

    offset = 0

    def __init__(self):
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values

    def frozen(self) -> PrefixCache:
        return PrefixCache(self.keys, self.values)


class Attention(nn.Module):
    def __init__(self, cfg: ShowoConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.dense = nn.Linear(dim, dim, bias=True)
        # Show-o normalises each head's 64 features with one shared affine, before RoPE
        # (`models/phi.py`, `PhiAttention.forward`), not on the 2048-wide projection as upstream Phi.
        self.q_layernorm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps)
        self.k_layernorm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps)
        self.rope = nn.RoPE(cfg.rotary_dim, traditional=False, base=cfg.rope_theta)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        b, n, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q = self.q_layernorm(heads(self.q_proj(x)))
        k = self.k_layernorm(heads(self.k_proj(x)))
        v = heads(self.v_proj(x))
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, self.scale, mask)
        return self.dense(out.transpose(0, 2, 1, 3).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ShowoConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))  # gelu_new = tanh approximation


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ShowoConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, mask, cache) + self.mlp(h)


class ShowoTransformer(nn.Module):
    """Token ids or embeddings in, logits (B, L, vocab) out; cache-aware."""

    def __init__(self, cfg: ShowoConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)

    def hidden_states(
        self,
        ids: mx.array | None = None,
        *,
        mask=None,
        cache: Sequence | None = None,
        input_embeddings: mx.array | None = None,
        collect: list | None = None,
    ) -> mx.array:
        x = self.embed_tokens(ids) if input_embeddings is None else input_embeddings
        if collect is not None:
            collect.append(x)
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask, c)
            if collect is not None:
                collect.append(x)
        x = self.final_layernorm(x)
        if collect is not None:
            collect.append(x)
        return x

    def __call__(self, ids: mx.array | None = None, **kwargs) -> mx.array:
        return self.lm_head(self.hidden_states(ids, **kwargs))

    def head_slice(self, h: mx.array, start: int, stop: int, head: nn.Module | None = None) -> mx.array:
        """Logits for vocabulary rows [start, stop) only: each logit is an independent dot product,
        so this equals slicing the full logits, at a fraction of the cost (MaskGIT needs only the
        8192 image-code rows of 58498)."""
        head = self.lm_head if head is None else head
        if "lora_b" in head and "linear" in head:  # LoRA adapters (mlx-lm's LoRALinear: linear(x) + scale·(x·A)·B)
            low = (h @ head.lora_a) @ head.lora_b[:, start:stop]
            return self.head_slice(h, start, stop, head.linear) + (head.scale * low).astype(h.dtype)
        bias = head["bias"][start:stop] if "bias" in head else None
        if isinstance(head, nn.QuantizedLinear):
            out = mx.quantized_matmul(
                h,
                head.weight[start:stop],
                scales=head.scales[start:stop],
                biases=head["biases"][start:stop] if "biases" in head else None,
                transpose=True,
                group_size=head.group_size,
                bits=head.bits,
                mode=head.mode,
            )
        else:
            out = h @ head.weight[start:stop].T
        return out + bias if bias is not None else out

    def prefix_cache(self, ids: mx.array, mask=None) -> list[PrefixCache]:
        """Run the prefix once and keep every layer's keys/values (no logits computed)."""
        recorders = [RecordingCache() for _ in self.layers]
        x = self.embed_tokens(ids)
        for layer, c in zip(self.layers, recorders):
            x = layer(x, mask, c)
        caches = [r.frozen() for r in recorders]
        mx.eval([c.state for c in caches])
        return caches
