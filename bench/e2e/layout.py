"""Model sizes, prompts, the KV block layout and chained block keys (numpy only, no torch).

Block layout (one choice for every store): the prompt is cut into chunks of `chunk_tokens`
tokens (256, LMCache's default chunk) and one block holds the whole KV of one chunk, every layer's
K and V: float32 `[layers][2 (K, V)][kv_heads][chunk_tokens][head_dim]`, head-major like the
model's own `[batch, heads, tokens, head_dim]` cache tensors. One block per chunk rather than one
per layer because a per-layer block of the bench model would be 128 KiB (latency-bound, 16 round
trips' worth of keys per chunk) while a chunk of all layers is 2 MiB, the size of a vLLM block of
Llama-3-8B (16 tokens x 128 KiB): the bandwidth-bound regime a KV tier lives in. Restoring then
gathers each layer's K and V out of the chunk blocks into one tensor, which is the copy a real
engine makes into its GPU KV pages (vLLM's connectors scatter CPU chunks per layer the same way).

Keys follow vLLM and LMCache: block i's key is SHA-256 over block i-1's key and chunk i's token
ids, seeded with the model id and the cache salt, so a block names its whole prefix and a lookup
of the chain finds the longest restorable prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

KIB, MIB = 1024, 1024 * 1024
FLOAT_BYTES = 4  # float32 KV: the tolerance check compares against an fp32 recompute

Tokens = npt.NDArray[np.int64]


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """A Llama-style config (`transformers.LlamaConfig` fields) and its weight seed."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    seed: int = 1234

    @property
    def model_id(self) -> str:
        """What the block keys and the kvtier namespace name: the weights are the seed's."""
        return f"e2e-llama-{self.name}-seed{self.seed}"

    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * FLOAT_BYTES

    def block_shape(self, chunk_tokens: int) -> tuple[int, int, int, int, int]:
        """The float32 shape of one chunk's block (see the module docstring)."""
        return (
            self.num_hidden_layers,
            2,
            self.num_key_value_heads,
            chunk_tokens,
            self.head_dim,
        )

    def block_bytes(self, chunk_tokens: int) -> int:
        return self.kv_bytes_per_token() * chunk_tokens

    def llama_config_kwargs(self) -> dict[str, int]:
        """Keyword arguments of `transformers.LlamaConfig` (everything but name and seed)."""
        kwargs = asdict(self)
        del kwargs["name"], kwargs["seed"]
        return kwargs

    def describe(self) -> str:
        return (
            f"{self.num_hidden_layers} layers, hidden {self.hidden_size}, "
            f"{self.num_attention_heads} heads / {self.num_key_value_heads} KV heads x "
            f"{self.head_dim}, MLP {self.intermediate_size}, vocab {self.vocab_size}"
        )


#: CI: a few ms per forward; the point is the bit-level check, not the timing.
SMALL = ModelSpec(
    name="small",
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)

#: The bench sweep: 55 M parameters, GQA like Llama 3; 8 KiB of fp32 KV per token, so a
#: 256-token block is 2 MiB and a 16k-token context 128 MiB; prefill ~500 tokens/s on 2 vCPU.
BENCH = ModelSpec(
    name="bench",
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
)

SPECS = {spec.name: spec for spec in (SMALL, BENCH)}


def context_tokens(spec: ModelSpec, length: int, seed: int) -> Tokens:
    """The shared prefix (a long document, a system prompt...): `length` seeded token ids."""
    rng = np.random.default_rng([seed, length, 1])
    return rng.integers(0, spec.vocab_size, size=length, dtype=np.int64)


def question_tokens(spec: ModelSpec, length: int, count: int, seed: int) -> Tokens:
    """A new request's own suffix, which no store has seen."""
    rng = np.random.default_rng([seed, length, 2])
    return rng.integers(0, spec.vocab_size, size=count, dtype=np.int64)


def chain_keys(model_id: str, salt: str, tokens: Tokens, chunk_tokens: int) -> list[bytes]:
    """The key of every full chunk of tokens: SHA-256 chained over the chunks' token ids."""
    parent = hashlib.sha256(f"kvtier-e2e\0{model_id}\0{salt}".encode()).digest()
    ids = np.ascontiguousarray(tokens, dtype="<i8")
    keys = []
    for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
        parent = hashlib.sha256(parent + ids[start : start + chunk_tokens].tobytes()).digest()
        keys.append(parent)
    return keys


def restorable_chunks(prompt_tokens: int, chunk_tokens: int) -> int:
    """Full chunks a prompt may take from a store: at least one token is always computed, since
    the first token's logits come out of the forward pass (vLLM leaves one out the same way)."""
    return max(0, (prompt_tokens - 1) // chunk_tokens)
