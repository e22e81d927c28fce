"""NIXL's OBJ backend, configured as Dynamo KVBM's G4 tier configures it, run as its own process
by test_dynamo_nixl.py (NIXL's C++ agent keeps threads of its own).

    python nixl_kv_client.py PARAMS_JSON < PLAN_JSON

PARAMS_JSON: the OBJ backend parameters. PLAN_JSON: a list of steps, run in order:
- {"op": "write", "keys": [...], "size": N, "seed": S}: one WRITE transfer of len(keys) objects;
  object i holds N bytes of the seed's random stream starting at byte i * 4096;
- {"op": "read", "key": K, "index": i, "size": N, "seed": S, "offset": O, "length": L}: a ranged
  READ of bytes O..O+L of object K, compared with what write put there;
- {"op": "query", "keys": [...]}: query_memory, which HEADs each object.
Prints one JSON line: a result per step ("DONE"/state, exact, or present flags).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from nixl_cu12._api import nixl_agent, nixl_agent_config

STRIDE = 4096


def _wait(agent: Any, handle: Any) -> str:
    state = agent.transfer(handle)
    deadline = time.monotonic() + 120
    while state == "PROC" and time.monotonic() < deadline:
        time.sleep(0.005)
        state = agent.check_xfer_state(handle)
    return str(state)


def _stream(seed: int, count: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size + STRIDE * count, dtype=np.uint8)


def write(agent: Any, step: dict[str, Any], first_device: int) -> str:
    keys, size = step["keys"], step["size"]
    data = _stream(step["seed"], len(keys), size)
    base = data.ctypes.data
    devices = range(first_device, first_device + len(keys))
    agent.register_memory([(base, data.nbytes, 0, "")], "DRAM", backends=["OBJ"])
    agent.register_memory(
        [(0, size, d, k) for d, k in zip(devices, keys, strict=True)], "OBJ", backends=["OBJ"]
    )
    handle = agent.initialize_xfer(
        "WRITE",
        agent.get_xfer_descs([(base + i * STRIDE, size, 0) for i in range(len(keys))], "DRAM"),
        agent.get_xfer_descs([(0, size, d) for d in devices], "OBJ"),
        agent.name,
    )
    state = _wait(agent, handle)
    sys.stderr.write(f"wrote {len(keys)} x {size} bytes: {state}\n")
    return state


def read(agent: Any, step: dict[str, Any], device: int) -> dict[str, Any]:
    offset, length, index = step["offset"], step["length"], step["index"]
    expected = _stream(step["seed"], index + 1, step["size"])[index * STRIDE :][offset:][:length]
    out = np.zeros(length, np.uint8)
    agent.register_memory([(out.ctypes.data, length, 0, "")], "DRAM", backends=["OBJ"])
    agent.register_memory([(0, step["size"], device, step["key"])], "OBJ", backends=["OBJ"])
    handle = agent.initialize_xfer(
        "READ",
        agent.get_xfer_descs([(out.ctypes.data, length, 0)], "DRAM"),
        agent.get_xfer_descs([(offset, length, device)], "OBJ"),
        agent.name,
    )
    state = _wait(agent, handle)
    return {"state": state, "exact": bool((out == expected).all())}


def main() -> None:
    params = json.loads(sys.argv[1])
    plan = json.load(sys.stdin)
    agent = nixl_agent("kvtier-dynamo-test", nixl_agent_config(backends=[]))
    agent.create_backend("OBJ", params)
    results: list[Any] = []
    device = 1  # an OBJ registration's device id names its object: never reused
    for step in plan:
        if step["op"] == "write":
            results.append(write(agent, step, device))
            device += len(step["keys"])
        elif step["op"] == "read":
            results.append(read(agent, step, device))
            device += 1
        else:
            found = agent.query_memory([(0, 0, 0, k) for k in step["keys"]], "OBJ", "OBJ")
            results.append([f is not None for f in found])
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
