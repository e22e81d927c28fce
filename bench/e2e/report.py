"""The e2e section of docs/benchmarks.md and its plots (docs/img/e2e_ttft.png, e2e_tps.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.e2e import layout, sweep

MIB = 1024 * 1024
LABELS = {
    "recompute": "recompute (full prefill)",
    "kvtier": "kvtier (negotiated transport)",
    "kvtier-shm": "kvtier, shm",
    "kvtier-tcp": "kvtier, tcp",
    "disk": "local files, page cache",
    "disk-cold": "local files, evicted from page cache",
    "redis": "Redis",
}


def _k(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per length and method, recompute first."""
    rows = []
    for entry in run["restored"]["lengths"].values():
        rec = entry["recompute"]["ttft_s"]
        base = {"length": entry["context_tokens"], "prompt": entry["prompt_tokens"]}
        rows.append({**base, "method": "recompute", **entry["recompute"], "ratio": 1.0})
        for method, m in entry["methods"].items():
            if "error" in m:
                rows.append({**base, "method": method, "error": m["error"]})
                continue
            rows.append({**base, "method": method, **m, "ratio": rec / m["ttft_s"]})
    return rows


def table(run: dict[str, Any]) -> str:
    """The markdown results table."""
    block = run["produced"]["lengths"]
    lines = [
        "| context | method | TTFT ms, best (median) | prompt tokens/s | recompute ÷ TTFT | "
        "restored tokens | "
        "fetch ms (GB/s) | rebuild ms | suffix prefill ms | check |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    checks = {(c["length"], c["method"]): c for c in run.get("checks", [])}
    for row in _rows(run):
        head = f"| {_k(row['length'])} | {LABELS.get(row['method'], row['method'])} |"
        if "error" in row:
            lines.append(f"{head} failed: {row['error']} | | | | | | | |")
            continue
        tps = row["prompt"] / row["ttft_s"]
        if row["method"] == "recompute":
            ttft = f"{row['ttft_s'] * 1e3:.0f} ({row['ttft_median_s'] * 1e3:.0f})"
            lines.append(f"{head} {ttft} | {tps:,.0f} | 1.0 | 0 | | | | |")
            continue
        size = row["restored_chunks"] * block[str(row["length"])]["block_bytes"]
        gbps = size / row["fetch_s"] / 1e9 if row["fetch_s"] > 0 else 0.0
        check = checks.get((row["length"], row["method"]), {"ok": False})
        lines.append(
            f"{head} {row['ttft_s'] * 1e3:.1f} ({row['ttft_median_s'] * 1e3:.0f}) | {tps:,.0f} | "
            f"{row['ratio']:.1f} | "
            f"{row['restored_tokens']} | {row['fetch_s'] * 1e3:.1f} ({gbps:.2f}) | "
            f"{row['build_s'] * 1e3:.1f} | {row['forward_s'] * 1e3:.1f} | "
            f"{'ok' if check['ok'] else 'FAILED'} |"
        )
    return "\n".join(lines)


def render(run: dict[str, Any]) -> str:
    """The markdown of the `e2e` section (between its markers in docs/benchmarks.md)."""
    job = run["job"]
    spec = layout.SPECS[job["model"]]
    chunk = job["chunk_tokens"]
    versions = run["restored"]["versions"]
    lines = [
        "`make e2e` (alone: `python -m bench.e2e [--quick]`; in `make bench` as its `e2e` "
        f"section, `--skip-e2e` leaves it out). Measured {run['date']} on {run['machine']}; "
        f"the sweep took {run['elapsed_s']:.0f} s, with a 5-minute load average of "
        f"{run['load_average_5m'][0]:.1f} before and {run['load_average_5m'][1]:.1f} after "
        "(other jobs share the machine). One run: the targets are ratios within it.",
        "",
        f"**Model.** `transformers.LlamaForCausalLM` (transformers {versions['transformers']}, "
        f"torch {versions['torch']} CPU, {versions['threads']} threads, float32, SDPA attention "
        "with the grouped KV heads handled inside SDPA also over a cache, "
        "`TRANSFORMERS_SDPA_FORCE_GQA=1`, rather than copied out to every query head) "
        f"built from a `LlamaConfig` with seeded random weights, no download: {spec.describe()}; "
        f"{spec.kv_bytes_per_token() // 1024} KiB of KV per token. CI runs the same code on a "
        f"small config ({layout.SMALL.describe()}; `tests/e2e/test_e2e_restore.py`).",
        "",
        f"**Workload.** Per context length, a shared prefix of that many tokens (random ids) and a "
        f"new {job['question_tokens']}-token question. Process 1 prefills the prefix and stores "
        f"its {chunk}-token chunks, each one block of "
        f"{spec.block_bytes(chunk) / MIB:g} MiB holding every layer's K and V, keyed by a SHA-256 "
        "chain over (model id, cache salt, token ids) like vLLM and LMCache: in kvtier "
        "(`KVClient.put_batch` into a dev cluster's 2 kvcache nodes, `kvtier up`), in one file "
        'per block (fsync\'d), and in Redis. Process 2 is fresh (another "GPU server"): it '
        "builds the model from the same seed and, for each method, hashes the prompt's chunks, "
        "asks for the restorable prefix in one call (`lookup`; files: a stat per block; "
        "Redis: a pipeline of EXISTS), fetches the blocks into a preallocated staging buffer "
        "(kvtier `get_batch` and file `readinto` land in it directly; Redis GET values are "
        "copied in), gathers each layer's K and V into the model's `DynamicCache` (the copy an "
        "engine makes into its GPU KV pages) and prefills only the question.",
        "",
        "**Measured.** TTFT = wall time from the prompt's token ids to the first token's id: "
        f"the best of {job['restore_repeats']} restores per method and of "
        f"{job['recompute_repeats']} recomputes, each after an untimed one (the methods take "
        "turns round by round), with the median in brackets. The best, because the machine is "
        "shared and other jobs only ever add time: single runs here vary up to 10x while "
        "others' test suites run (every run is in `bench/results/e2e.json`). Each part below "
        "is its own best. Prompt tokens/s = prompt tokens / best TTFT. "
        "Process start, model build and client connections are not in TTFT (a serving engine "
        "has them already). `fetch` is `get_into` alone (its GB/s = restored bytes / fetch time); "
        "`rebuild` is the gather into the cache; `suffix prefill` the forward pass over the "
        "question. The cold-file rows evict every block file from the page cache before each "
        "restore with `posix_fadvise(DONTNEED)` (fsync'd files, so the reads hit the disk); "
        "dropping the whole page cache (`/proc/sys/vm/drop_caches`) needs root and would hit "
        "every other job on the machine, so it is not used. "
        "The warm-file rows read what the page cache kept from the writes: the best a "
        "local-disk tier can do.",
        "",
        "**Checked** (every restore, every run; also in CI): the restorer recomputes the whole "
        f"prompt too; each restore's first-token logits are within {sweep.LOGIT_TOLERANCE:g} "
        f"(max abs), its restored KV within {sweep.KV_TOLERANCE:g} of the recompute's, "
        f"and its {job['generate_tokens']} greedy tokens are the recompute's. "
        "The staging buffer is filled with NaN before every restore.",
        "",
        table(run),
        "",
    ]
    lines += _reading(run)
    lines += _setup(run)
    lines += ["", "| target | ratio in this run | detail | met |", "|---|---:|---|---|"]
    for check in run["targets"]:
        lines.append(
            f"| {check['target']} | {check['ratio']:.2f} | {check['detail']} | "
            f"{'yes' if check['ok'] else 'NO'} |"
        )
    lines += ["", "![TTFT by context length](img/e2e_ttft.png)", ""]
    lines += ["![prompt tokens/s by context length](img/e2e_tps.png)"]
    return "\n".join(lines)


def _reading(run: dict[str, Any]) -> list[str]:
    """What the largest context's rows say: where a restore's time goes, store by store."""
    entry = list(run["restored"]["lengths"].values())[-1]
    done = {k: m for k, m in entry["methods"].items() if "error" not in m}
    if not done:
        return []
    best, m = min(done.items(), key=lambda item: item[1]["ttft_s"])
    rec = entry["recompute"]["ttft_s"]
    fetches = "; ".join(
        f"{LABELS.get(k, k)} {v['fetch_s'] * 1e3:.1f} ms" for k, v in sorted(done.items())
    )
    return [
        f"**Reading** (at {_k(entry['context_tokens'])} tokens). A recompute takes "
        f"{rec:.1f} s; the fastest restore ({LABELS.get(best, best)}) {m['ttft_s'] * 1e3:.0f} ms, "
        f"{rec / m['ttft_s']:.0f}x sooner: {m['fetch_s'] * 1e3:.1f} ms to fetch the blocks, "
        f"{m['build_s'] * 1e3:.1f} ms to rebuild the cache and {m['forward_s'] * 1e3:.0f} ms to "
        "prefill the question over the restored context. Only the fetch depends on the store "
        f"({fetches}); the rest is the model's, the same work for every store, so where two "
        "stores' TTFTs differ by more or less than their fetch times do, the rest is noise "
        "from the other jobs on the machine. This machine has no GPU: a GPU prefills orders of "
        "magnitude faster while fetching from host memory or the network is not faster, so "
        "there the ratio to recompute depends on the model's size and the link. What this run "
        "shows is a real model's KV cache going through kvtier from one process to another, "
        "restored exactly, and what each store costs on the CPU side.",
        "",
    ]


def _setup(run: dict[str, Any]) -> list[str]:
    lines = []
    for length, p in run["produced"]["lengths"].items():
        puts = ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in p["put_s"].items())
        lines.append(
            f"- {_k(int(length))}: process 1 prefilled the context in {p['prefill_s']:.1f} s and "
            f"stored {p['chunks']} blocks ({p['chunks'] * p['block_bytes'] / MIB:.0f} MiB): "
            f"{puts}."
        )
    for name, note in run.get("notes", {}).items():
        lines.append(f"- {name}: {note}")
    return lines


def plot(run: dict[str, Any], img_dir: Path) -> None:
    """docs/img/e2e_ttft.png (TTFT, log scale) and e2e_tps.png (prompt tokens/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in _rows(run):
        if "error" not in row:
            point = (row["length"], row["ttft_s"], row["prompt"] / row["ttft_s"])
            series.setdefault(row["method"], []).append(point)
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, index, ylabel, title in (
        ("e2e_ttft.png", 1, "TTFT, ms (log scale)", "time to first token"),
        ("e2e_tps.png", 2, "prompt tokens / s (log scale)", "prompt tokens per second of TTFT"),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for method, points in series.items():
            xs = [p[0] for p in points]
            ys = [p[index] * (1e3 if index == 1 else 1) for p in points]
            style = "--" if method == "recompute" else "-"
            ax.plot(xs, ys, style, marker="o", label=LABELS.get(method, method))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([p[0] for p in next(iter(series.values()))])
        ax.set_xticklabels([_k(p[0]) for p in next(iter(series.values()))])
        ax.set_xlabel("context (shared prefix) tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {run['job']['model']} model, {run['machine'].split(',')[0]}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img_dir / name, dpi=110)
        plt.close(fig)
