"""What the sweep asks of a worker process (a JSON file), and the stores a job's methods name.

Methods: `kvtier` (transport negotiated: shm on one host), `kvtier-shm`, `kvtier-tcp`, `disk`
(files, page cache warm), `disk-cold` (files evicted from the page cache before each restore),
`redis`. Families are what the producer writes once for all methods that read them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.e2e import layout, stores

METHODS = ("kvtier", "kvtier-shm", "kvtier-tcp", "disk", "disk-cold", "redis")


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """One producer or restorer run: the model, the contexts, the stores and the repeats."""

    model: str = "small"
    lengths: tuple[int, ...] = (1024,)
    question_tokens: int = 32
    chunk_tokens: int = 256
    salt: str = "e2e"
    prompt_seed: int = 7
    generate_tokens: int = 8
    recompute_repeats: int = 1
    restore_repeats: int = 3
    methods: tuple[str, ...] = ("kvtier", "disk", "redis")
    metadata: str = ""
    redis_port: int = 0
    disk_dir: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
        if self.model not in layout.SPECS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(layout.SPECS)}")

    @property
    def spec(self) -> layout.ModelSpec:
        return layout.SPECS[self.model]

    @property
    def namespace(self) -> str:
        """kvtier namespace: model and cache salt, as an engine would name it."""
        return f"{self.spec.model_id}@{self.salt}"

    def families(self) -> list[str]:
        """The stores the producer writes: kvtier, disk and/or redis."""
        found = {family(m) for m in self.methods}
        return [f for f in ("kvtier", "disk", "redis") if f in found]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Job:
        raw: dict[str, Any] = json.loads(path.read_text())
        raw["lengths"] = tuple(raw["lengths"])
        raw["methods"] = tuple(raw["methods"])
        return cls(**raw)


def family(method: str) -> str:
    """kvtier, disk or redis."""
    return method.split("-", 1)[0]


def open_store(job: Job, method: str) -> stores.BlockStore:
    """The store a method reads (or, for a family name, the producer writes)."""
    kind = family(method)
    if kind == "kvtier":
        transports = [method.split("-", 1)[1]] if "-" in method else []
        return stores.KVTierStore(method, job.metadata, job.namespace, transports)
    if kind == "disk":
        return stores.FileStore(method, Path(job.disk_dir), cold=method == "disk-cold")
    if kind == "redis":
        return stores.RedisStore(method, job.redis_port)
    raise ValueError(f"unknown method {method!r}")
