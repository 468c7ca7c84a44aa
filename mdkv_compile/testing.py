"""Random-weight models (no download) and one greedy decode, shared by the tests, `mdkv explain
--arch`, the benchmarks, `mdkv bench --suite e2e` and the examples.

Models (the same seed gives the same weights):

* `tiny_model(arch)`: the decoder-only architectures `mdkv.patch` serves (`TINY_ARCHS`), 2 layers,
  4 query / 2 KV heads of dim 16, vocabulary 256;
* `build_tiny_model(arch)`: the architectures `mdkv explain` shows (`EXPLAIN_ARCHS`, encoders
  and encoder-decoders included), 2 layers, hidden 64, vocabulary 128;
* `random_llama(**config)`: a Llama of any shape (LlamaConfig fields).

Greedy decoding over an explicit cache, gpt-fast style: `prefill` and `decode_one_token` return
next-token logits, `decode_n_tokens` runs greedy steps, `greedy_decode` is both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

# (config class, model class, extra config kwargs)
TINY_ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention", "full_attention"],
         "num_hidden_layers": 3, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16},
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention", "full_attention"],
         "num_hidden_layers": 3, "query_pre_attn_scalar": 16},
    ),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM of one of `TINY_ARCHS` (Gemma 2 with eager attention, the others SDPA)."""
    config_name, model_name, extra = TINY_ARCHS[arch]
    kwargs = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )
    kwargs.update(extra)
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "sdpa" if arch not in ("gemma2",) else "eager"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


EXPLAIN_ARCHS = ("llama", "qwen2", "mistral", "gpt2", "opt", "gpt_neox", "bert", "t5", "bart")


def build_tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-64 random-weight model of one of `EXPLAIN_ARCHS` from a transformers config."""
    tf = transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=128, max_position_embeddings=64)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        cfg = cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
        if arch == "mistral":
            cfg.sliding_window = None  # full attention, as in Mistral v0.2+ (a window is skipped)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    elif arch == "opt":
        cfg = tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
            **common,
        )
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    elif arch == "bert":
        cfg = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, **common)
    elif arch == "t5":
        cfg = tf.T5Config(
            d_model=64,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            d_kv=16,
            vocab_size=128,
            decoder_start_token_id=0,
        )
    elif arch == "bart":
        cfg = tf.BartConfig(
            d_model=64,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            **common,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    if arch == "bert":
        model = tf.BertModel._from_config(cfg, attn_implementation=attn_implementation)
    elif arch == "t5":
        model = tf.T5ForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    elif arch == "bart":
        model = tf.BartForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model.eval()


def random_llama(
    seed: int = 0,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **config: Any,
) -> transformers.LlamaForCausalLM:
    """A random-weight Llama with `config` as its LlamaConfig fields; the global generator is
    seeded with `seed` just before the weights are made. `dtype` / `device`: make the weights in
    that dtype on that device directly (a large model never exists in float32 on the host)."""
    cfg = transformers.LlamaConfig(**config)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    if dtype is None and device is None:
        return transformers.LlamaForCausalLM(cfg).eval()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device or "cpu"):
            return transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)


# --- greedy decoding over an explicit cache --------------------------------------------------------


def prefill(model: torch.nn.Module, ids: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
    """Run the prompt `ids` [B, N] into `cache`; the next-token logits [B, V]."""
    return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs).logits[:, -1]


def decode_one_token(model: torch.nn.Module, token: torch.Tensor, cache: Any, **kwargs: Any) -> torch.Tensor:
    """One decode step of `token` [B, 1] over `cache`; the next-token logits [B, V]."""
    return model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs).logits[:, -1]


def decode_n_tokens(
    model: torch.nn.Module, cache: Any, logits: torch.Tensor, n: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`n` greedy steps from the next-token `logits` [B, V]: the tokens fed ([B, 1] each) and the
    logits after each step ([B, V] each)."""
    tokens, steps = [], []
    for _ in range(n):
        tokens.append(logits.argmax(-1, keepdim=True))
        logits = decode_one_token(model, tokens[-1], cache)
        steps.append(logits)
    return tokens, steps


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module, cache: Any, ids: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, steps] of a prefill of `ids` and `steps` decode steps over `cache`, and the
    last step's logits [B, V]."""
    tokens, logits = decode_n_tokens(model, cache, prefill(model, ids, cache), steps)
    return torch.cat(tokens, 1), logits[-1]


# --- hand-written decoders (outside transformers): what the attention finder and the backend see
# in gpt-fast / torchtune style code. Width DIM, HEADS query heads of HEAD_DIM.

DIM, HEADS, HEAD_DIM = 64, 4, 16


# Static KV buffers written at input_pos, a causal buffer indexed by input_pos, fused wqkv,
# repeat_interleave GQA, einsum + masked_fill + div scale (gpt-fast style).


class StaticKVAttention(nn.Module):
    """`write`: "setitem" (`k_cache[:, :, input_pos] = k`) or "index_copy" (`index_copy_(2, input_pos, k)`);
    `sdpa`: F.scaled_dot_product_attention with the bool mask instead of the einsum chain."""

    def __init__(self, n_kv: int = 2, max_seq: int = 16, write: str = "setitem", sdpa: bool = False) -> None:
        super().__init__()
        self.n_kv, self.write, self.sdpa = n_kv, write, sdpa
        self.wqkv = nn.Linear(DIM, (HEADS + 2 * n_kv) * HEAD_DIM, bias=False)
        self.wo = nn.Linear(DIM, DIM, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, n_kv, max_seq, HEAD_DIM))
        self.register_buffer("v_cache", torch.zeros(1, n_kv, max_seq, HEAD_DIM))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        kv = self.n_kv * HEAD_DIM
        q, k, v = self.wqkv(x).split([DIM, kv, kv], dim=-1)
        q = q.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(b, t, self.n_kv, HEAD_DIM).transpose(1, 2)
        v = v.view(b, t, self.n_kv, HEAD_DIM).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if self.write == "index_copy":
            self.k_cache.index_copy_(2, input_pos, k)
            self.v_cache.index_copy_(2, input_pos, v)
        else:
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
        keys = self.k_cache.repeat_interleave(HEADS // self.n_kv, dim=1)
        values = self.v_cache.repeat_interleave(HEADS // self.n_kv, dim=1)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            scores = torch.einsum("bhqd,bhkd->bhqk", q, keys) / math.sqrt(HEAD_DIM)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = F.softmax(scores.float(), dim=-1).type_as(q)
            out = torch.einsum("bhqk,bhkd->bhqd", probs, values)
        return self.wo(out.transpose(1, 2).reshape(b, t, DIM))


class StaticKVDecoder(nn.Module):
    """`layer_kw`: keyword arguments of each layer's StaticKVAttention (default: two plain layers)."""

    def __init__(
        self,
        layers: int = 2,
        max_seq: int = 16,
        causal_buffer: torch.Tensor | None = None,
        layer_kw: list[dict] | None = None,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, DIM)
        kws = layer_kw or [{} for _ in range(layers)]
        self.layers = nn.ModuleList(StaticKVAttention(max_seq=max_seq, **kw) for kw in kws)
        buf = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool)) if causal_buffer is None else causal_buffer
        self.register_buffer("causal_mask", buf)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        mask = self.causal_mask[None, None, input_pos]
        for layer in self.layers:
            x = x + layer(x, mask, input_pos)
        return x


# Past keys/values passed in and returned as tensors (torch.cat), MQA via expand, q pre-scaled,
# method-form matmul/softmax, causal mask from tril(ones, diagonal=past) applied with torch.where.


class CatAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(DIM, DIM)
        self.k_proj = nn.Linear(DIM, HEAD_DIM)  # one kv head (MQA)
        self.v_proj = nn.Linear(DIM, HEAD_DIM)
        self.o_proj = nn.Linear(DIM, DIM)

    def forward(
        self,
        x: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        flip_mask: bool = False,
        diagonal: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, HEADS, HEAD_DIM).permute(0, 2, 1, 3) * HEAD_DIM**-0.5
        k = torch.cat([past_k, self.k_proj(x).view(b, t, 1, HEAD_DIM).transpose(1, 2)], dim=2)
        v = torch.cat([past_v, self.v_proj(x).view(b, t, 1, HEAD_DIM).transpose(1, 2)], dim=2)
        s = k.shape[2]
        allowed = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(
            diagonal=s - t if diagonal is None else diagonal
        )
        if flip_mask:  # a bug we must not accept: masks the past instead of the future
            allowed = ~allowed
        scores = q.matmul(k.expand(b, HEADS, s, HEAD_DIM).transpose(-1, -2))
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v.expand(b, HEADS, s, HEAD_DIM)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, DIM)), k, v


class CatDecoder(nn.Module):
    def __init__(self, flip_mask: bool = False, diagonal: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(128, DIM)
        self.blocks = nn.ModuleList(CatAttention() for _ in range(2))
        self.flip_mask = flip_mask
        self.diagonal = diagonal  # a constant diagonal: right only for one cache length

    def forward(self, idx: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]):
        x = self.emb(idx)
        new_past = []
        for blk, (pk, pv) in zip(self.blocks, past, strict=True):
            h, k, v = blk(x, pk, pv, self.flip_mask, self.diagonal)
            x = x + h
            new_past.append((k, v))
        return x, new_past


def empty_past(n: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(1, 1, n, HEAD_DIM), torch.randn(1, 1, n, HEAD_DIM)) for _ in range(2)]
