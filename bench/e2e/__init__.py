"""End-to-end proof: a transformer's prefix KV cache restored from kvtier instead of recomputed.

A Llama-style model (Hugging Face `transformers`, seeded random weights, no download) prefills a
long shared prefix in one process, which stores the prefix's KV blocks in kvtier, in local files
and in Redis. A fresh process (another "GPU server") builds the same model, restores the prefix
from each store and runs only the new suffix; its time to first token (TTFT) is compared with a
full recompute, and its logits and greedy tokens must match the recompute's.

Modules: `layout` (model sizes, block layout, chained block keys; no torch), `stores` (kvtier,
files, Redis behind one small interface; no torch), `servers` (a dev cluster and a redis-server
for a run), `engine` (the model and the KV cache, torch), `worker` (the producer and restorer
processes), `sweep` (`python -m bench.e2e`: runs them, checks, plots, writes the report).
"""
