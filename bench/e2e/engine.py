"""The model and its KV cache (torch and transformers): prefill, greedy decoding, and moving a
prefix's KV between the model's `DynamicCache` and store blocks (layout: `bench.e2e.layout`).

Everything runs in float32 on the CPU under `torch.inference_mode()`.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
import torch
import transformers

from bench.e2e import layout


def build_model(spec: layout.ModelSpec) -> transformers.LlamaForCausalLM:
    """The spec's model with weights drawn from its seed: every process gets the same model.

    Attention runs grouped-query heads in SDPA itself (`enable_gqa`) also when a mask is passed,
    as it does unmasked: otherwise transformers copies each layer's cached K and V out to every
    query head (`repeat_kv`) on each forward pass over a cache, 512 MiB of copies for a 32-token
    suffix over a 16k-token cache, which made that forward pass 3-6x slower on 2 vCPU.
    """
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"  # read per call by transformers' SDPA
    torch.manual_seed(spec.seed)
    config = transformers.LlamaConfig(
        **spec.llama_config_kwargs(), attn_implementation="sdpa", dtype=torch.float32
    )
    return transformers.LlamaForCausalLM(config).eval()


def weights_digest(model: transformers.LlamaForCausalLM) -> float:
    """A cheap fingerprint of the weights (processes compare it before trusting each other)."""
    with torch.inference_mode():
        return float(sum(p.double().abs().sum() for p in model.parameters()))


def forward(
    model: transformers.LlamaForCausalLM,
    tokens: npt.NDArray[np.int64],
    cache: transformers.DynamicCache | None = None,
) -> tuple[torch.Tensor, transformers.DynamicCache]:
    """Run tokens after what cache holds; the last position's logits and the grown cache."""
    ids = torch.from_numpy(np.ascontiguousarray(tokens)).unsqueeze(0)
    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.cache


def greedy(
    model: transformers.LlamaForCausalLM,
    logits: torch.Tensor,
    cache: transformers.DynamicCache,
    count: int,
) -> list[int]:
    """`count` greedy tokens: the argmax of logits, then one forward step per further token."""
    tokens = [int(logits.argmax())]
    while len(tokens) < count:
        logits, cache = forward(model, np.array([tokens[-1]], np.int64), cache)
        tokens.append(int(logits.argmax()))
    return tokens


def pack_blocks(
    cache: transformers.DynamicCache, spec: layout.ModelSpec, chunk_tokens: int, chunks: int
) -> npt.NDArray[np.uint8]:
    """The first `chunks` chunks of cache as blocks: uint8 `[chunks, block_bytes]`."""
    shape = spec.block_shape(chunk_tokens)
    out = np.empty((chunks, *shape), np.float32)
    heads, dim = spec.num_key_value_heads, spec.head_dim
    staged = torch.from_numpy(out)
    for index, layer in enumerate(cache.layers):
        for kv, tensor in enumerate((layer.keys, layer.values)):
            prefix = tensor[0, :, : chunks * chunk_tokens]  # [heads, tokens, dim]
            by_chunk = prefix.reshape(heads, chunks, chunk_tokens, dim).permute(1, 0, 2, 3)
            staged[:, index, kv].copy_(by_chunk)
    return out.reshape(chunks, -1).view(np.uint8)


def staged_tensor(
    staging: npt.NDArray[np.uint8], spec: layout.ModelSpec, chunk_tokens: int, chunks: int
) -> torch.Tensor:
    """The first `chunks` rows of a uint8 staging buffer, seen (no copy) as float32 blocks."""
    floats = staging[:chunks].view(np.float32)
    return torch.from_numpy(floats).view(chunks, *spec.block_shape(chunk_tokens))


def cache_from_blocks(
    model: transformers.LlamaForCausalLM, blocks: torch.Tensor
) -> transformers.DynamicCache:
    """A `DynamicCache` holding the prefix that blocks (`staged_tensor`) carry.

    Each layer's K and V are gathered out of the chunk blocks into one contiguous
    `[1, kv_heads, tokens, head_dim]` tensor (the one copy a restore makes; on a GPU this is the
    host-to-device copy into the KV pages) and handed to the cache as they are:
    `DynamicCache(ddp_cache_data=...)` would copy them a second time (its layers `torch.cat` onto
    an empty tensor), about as long as the fetch itself at 16k tokens.
    """
    chunks, _layers, _kv, heads, chunk_tokens, dim = blocks.shape
    cache = transformers.DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        keys, values = (
            blocks[:, index, kv].permute(1, 0, 2, 3).reshape(1, heads, chunks * chunk_tokens, dim)
            for kv in (0, 1)
        )
        layer.lazy_initialization(keys, values)  # device, dtype, is_initialized
        layer.keys, layer.values = keys, values
    return cache
