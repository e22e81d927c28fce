"""kvtier: an open storage tier that keeps LLM inference fed.

The one package that users, plugins, the CLI and every service import. Nothing happens at import
time; submodules are imported by the code that needs them.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.kv import AsyncKVClient, Durability, PutResult, PutStatus
    from kvtier.kv_stats import KVStats
    from kvtier.kv_sync import KVClient
    from kvtier.objects import AsyncObjectClient, ObjectClient

__all__ = [
    "AsyncKVClient",
    "AsyncObjectClient",
    "Durability",
    "KVClient",
    "KVStats",
    "ObjectClient",
    "PutResult",
    "PutStatus",
    "__version__",
]

_LAZY = {
    "KVClient": "kvtier.kv_sync",
    "AsyncKVClient": "kvtier.kv",
    "PutStatus": "kvtier.kv",
    "PutResult": "kvtier.kv",
    "KVStats": "kvtier.kv_stats",
    "Durability": "kvtier.kv",
    "ObjectClient": "kvtier.objects",
    "AsyncObjectClient": "kvtier.objects",
}


def __getattr__(name: str) -> Any:
    """The SDK's entry points, imported on first use (importing kvtier stays cheap)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
