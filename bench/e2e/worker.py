"""A "GPU server" process: `python -m bench.e2e.worker produce|restore JOB.json OUT.json`.

produce: build the model, prefill each context, store its full chunks' KV blocks in every store
family of the job (kvtier, files, Redis), with their chained keys.

restore: a fresh process with no KV of its own. Build the same model (same seed), then for each
context length, with the prompt = context + a new question:
- recompute: prefill the whole prompt; the reference logits, greedy tokens and KV;
- each method: hash the prompt's chunks, `lookup` the chain, fetch the present blocks into a
  preallocated staging buffer, rebuild the `DynamicCache`, prefill only the rest of the prompt.
TTFT is the wall time from the prompt to the first token's id. The staging buffer is filled with
NaN before every restore (untimed), so a store that did not deliver cannot pass on stale bytes.
Round 0 is untimed: it checks the greedy continuation; every round checks the first-token
logits and the restored KV against the recompute. A method that fails is reported, not fatal.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import transformers

from bench.e2e import engine, jobs, layout, stores

#: The parts of a restore's TTFT, in order.
PARTS = ("hash_s", "lookup_s", "fetch_s", "build_s", "forward_s")


def _versions() -> dict[str, str]:
    return {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "threads": str(torch.get_num_threads()),
    }


def produce(job: jobs.Job, model: transformers.LlamaForCausalLM) -> dict[str, Any]:
    """Prefill every context and store its blocks; timings per length."""
    spec, chunk = job.spec, job.chunk_tokens
    targets = {name: jobs.open_store(job, name) for name in job.families()}
    out: dict[str, Any] = {}
    try:
        for store in targets.values():
            store.warm_up()
        engine.forward(model, layout.question_tokens(spec, 0, 64, job.prompt_seed))  # kernels
        for length in job.lengths:
            context = layout.context_tokens(spec, length, job.prompt_seed)
            started = time.perf_counter()
            _, cache = engine.forward(model, context)
            prefill_s = time.perf_counter() - started
            chunks = length // chunk
            keys = layout.chain_keys(spec.model_id, job.salt, context, chunk)[:chunks]
            blocks = list(engine.pack_blocks(cache, spec, chunk, chunks))
            put_s = {}
            for name, store in targets.items():
                started = time.perf_counter()
                store.put(keys, blocks)
                put_s[name] = time.perf_counter() - started
            out[str(length)] = {
                "prefill_s": prefill_s,
                "chunks": chunks,
                "block_bytes": spec.block_bytes(chunk),
                "put_s": put_s,
            }
    finally:
        for store in targets.values():
            store.close()
    return out


class Reference:
    """The recompute's result for one prompt: what every restore must reproduce."""

    def __init__(self, logits: torch.Tensor, cache: transformers.DynamicCache) -> None:
        self.logits = logits
        self.kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.tokens: list[int] = []

    def kv_diff(self, cache: transformers.DynamicCache, tokens: int) -> float:
        """Largest |difference| between cache's first `tokens` positions and the recompute's."""
        worst = 0.0
        if tokens == 0:
            return worst
        for (ref_k, ref_v), layer in zip(self.kv, cache.layers, strict=True):
            for ref, got in ((ref_k, layer.keys), (ref_v, layer.values)):
                diff = (got[:, :, :tokens] - ref[:, :, :tokens]).abs().max()
                worst = max(worst, float(diff))
        return worst


def recompute(
    job: jobs.Job, model: transformers.LlamaForCausalLM, prompt: npt.NDArray[np.int64]
) -> tuple[Reference, list[float]]:
    """An untimed prefill of the whole prompt (the reference, with its greedy tokens), then
    `recompute_repeats` timed ones, as the restores have an untimed round first."""
    logits, cache = engine.forward(model, prompt)
    reference = Reference(logits, cache)
    reference.tokens = engine.greedy(model, logits, cache, job.generate_tokens)
    times = []
    for _ in range(job.recompute_repeats):
        started = time.perf_counter()
        logits, _ = engine.forward(model, prompt)
        int(logits.argmax())
        times.append(time.perf_counter() - started)
    return reference, times


class Restorer:
    """Restores a prompt's prefix from one store and checks the result against the reference."""

    def __init__(
        self, job: jobs.Job, model: transformers.LlamaForCausalLM, staging: npt.NDArray[np.uint8]
    ) -> None:
        self.job, self.model, self.staging = job, model, staging

    def once(
        self,
        store: stores.BlockStore,
        prompt: npt.NDArray[np.int64],
        reference: Reference,
        check_tokens: bool,
    ) -> dict[str, Any]:
        """One timed restore: TTFT and its parts, and the checks (untimed)."""
        spec, chunk = self.job.spec, self.job.chunk_tokens
        restorable = layout.restorable_chunks(len(prompt), chunk)
        head = prompt[: restorable * chunk]
        store.before_restore(layout.chain_keys(spec.model_id, self.job.salt, head, chunk))
        self.staging[:restorable].fill(0xFF)  # NaN: nothing stale can pass for a restored block
        marks = [time.perf_counter()]
        keys = layout.chain_keys(spec.model_id, self.job.salt, head, chunk)
        marks.append(time.perf_counter())
        count = store.lookup(keys)
        marks.append(time.perf_counter())
        store.get_into(keys[:count], list(self.staging[:count]))
        marks.append(time.perf_counter())
        cache = None
        if count:
            blocks = engine.staged_tensor(self.staging, spec, chunk, count)
            cache = engine.cache_from_blocks(self.model, blocks)
        marks.append(time.perf_counter())
        logits, cache = engine.forward(self.model, prompt[count * chunk :], cache)
        first = int(logits.argmax())
        marks.append(time.perf_counter())
        parts = np.diff(marks).tolist()
        result: dict[str, Any] = {
            "ttft_s": marks[-1] - marks[0],
            **dict(zip(PARTS, parts, strict=True)),
            "restored_chunks": count,
            "logit_diff": float((logits - reference.logits).abs().max()),
            "kv_diff": reference.kv_diff(cache, count * chunk),
            "first_token_ok": first == reference.tokens[0],
        }
        if check_tokens:
            result["tokens"] = engine.greedy(self.model, logits, cache, self.job.generate_tokens)
        return result


def _summary(
    runs: Sequence[dict[str, Any]], check: dict[str, Any], job: jobs.Job
) -> dict[str, Any]:
    """The best of the timed runs for TTFT and each of its parts (other jobs on the machine only
    ever add time), the median TTFT, and worst-case checks over every run (round 0 included)."""
    every = [check, *runs]
    out: dict[str, Any] = {key: min(r[key] for r in runs) for key in ("ttft_s", *PARTS)}
    out["ttft_median_s"] = statistics.median(r["ttft_s"] for r in runs)
    out["ttft_runs_s"] = [r["ttft_s"] for r in runs]
    counts = sorted({r["restored_chunks"] for r in every})
    out["restored_chunks"] = counts[0]
    out["restored_tokens"] = counts[0] * job.chunk_tokens
    out["same_chunks_every_run"] = len(counts) == 1
    out["logit_diff"] = max(r["logit_diff"] for r in every)
    out["kv_diff"] = max(r["kv_diff"] for r in every)
    out["first_token_ok"] = all(r["first_token_ok"] for r in every)
    out["tokens"] = check["tokens"]
    return out


def restore(job: jobs.Job, model: transformers.LlamaForCausalLM) -> dict[str, Any]:
    """Recompute, then restore from every method, for each context length."""
    spec, chunk = job.spec, job.chunk_tokens
    most = max(layout.restorable_chunks(n + job.question_tokens, chunk) for n in job.lengths)
    # The engine's pinned staging pool: allocated and faulted in once, reused by every restore.
    staging = np.full((max(most, 1), spec.block_bytes(chunk)), 0xFF, np.uint8)
    sources = {method: jobs.open_store(job, method) for method in job.methods}
    restorer = Restorer(job, model, staging)
    out: dict[str, Any] = {}
    try:
        for store in sources.values():
            store.warm_up()
        engine.forward(model, layout.question_tokens(spec, 0, 64, job.prompt_seed))  # kernels
        for length in job.lengths:
            context = layout.context_tokens(spec, length, job.prompt_seed)
            question = layout.question_tokens(spec, length, job.question_tokens, job.prompt_seed)
            prompt = np.concatenate([context, question])
            reference, times = recompute(job, model, prompt)
            entry: dict[str, Any] = {
                "context_tokens": length,
                "prompt_tokens": len(prompt),
                "restorable_chunks": layout.restorable_chunks(len(prompt), chunk),
                "logit_scale": float(reference.logits.abs().max()),
                "recompute": {
                    "ttft_s": min(times),
                    "ttft_median_s": statistics.median(times),
                    "ttft_runs_s": times,
                    "tokens": reference.tokens,
                },
                "methods": {},
            }
            entry["methods"] = _restore_all(restorer, sources, prompt, reference)
            out[str(length)] = entry
    finally:
        for store in sources.values():
            store.close()
    return out


def _restore_all(
    restorer: Restorer,
    sources: dict[str, stores.BlockStore],
    prompt: npt.NDArray[np.int64],
    reference: Reference,
) -> dict[str, Any]:
    """Rounds of every method in turn (round 0 untimed); a failing method records its error."""
    job = restorer.job
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in sources}
    errors: dict[str, str] = {}
    for round_ in range(job.restore_repeats + 1):
        for method, store in sources.items():
            if method in errors:
                continue
            try:
                runs[method].append(restorer.once(store, prompt, reference, round_ == 0))
            except Exception as exc:
                traceback.print_exc()
                errors[method] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    out: dict[str, Any] = {}
    for method, done in runs.items():
        if method in errors:
            out[method] = {"error": errors[method]}
        else:
            out[method] = _summary(done[1:], done[0], job)
            out[method]["tokens_ok"] = out[method]["tokens"] == reference.tokens
    return out


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("produce", "restore"):
        sys.stderr.write(__doc__.splitlines()[0] + "\n")
        return 2
    role, job_path, out_path = argv
    job = jobs.Job.load(Path(job_path))
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    model = engine.build_model(job.spec)
    result: dict[str, Any] = {
        "role": role,
        "model_build_s": time.perf_counter() - started,
        "weights_digest": engine.weights_digest(model),
        "versions": _versions(),
    }
    result["lengths"] = produce(job, model) if role == "produce" else restore(job, model)
    Path(out_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
