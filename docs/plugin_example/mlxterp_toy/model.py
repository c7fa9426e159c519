"""ToyLM: a Llama-style decoder with Meta's original parameter names."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.rope = nn.RoPE(self.head_dim)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q = self.wq(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.wk(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q), self.rope(k)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.head_dim**-0.5, mask=mask)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = nn.RMSNorm(dim)
        self.ffn_norm = nn.RMSNorm(dim)

    def __call__(self, x, mask=None, cache=None):
        h = x + self.attention(self.attention_norm(x), mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class ToyLM(nn.Module):
    model_type = "toy"

    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 48):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.blocks = [Block(dim, n_heads, n_kv_heads, hidden) for _ in range(layers)]
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def __call__(self, tokens: mx.array, cache=None):
        h = self.tok_embeddings(tokens)
        mask = create_attention_mask(h, None)
        for block in self.blocks:
            h = block(h, mask)
        return self.output(self.norm(h))
