"""NIXL's OBJ backend against a kvtier bucket, run as its own process by test_s3_nixl.py (NIXL's
C++ agent keeps threads of its own).

    python nixl_obj_client.py PARAMS_JSON

PARAMS_JSON: the OBJ backend's parameters (bucket, endpoint, https with the cluster's CA as
`ca_bundle`, keys). Prints one JSON line with what it saw."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from nixl_cu12._api import nixl_agent, nixl_agent_config


def _wait(agent: Any, handle: Any) -> str:
    state = agent.transfer(handle)
    deadline = time.monotonic() + 60
    while state == "PROC" and time.monotonic() < deadline:
        time.sleep(0.005)
        state = agent.check_xfer_state(handle)
    return str(state)


def main() -> None:
    params = json.loads(sys.argv[1])  # the OBJ backend's parameters (s3_cluster.nixl_params)
    agent = nixl_agent("kvtier-test", nixl_agent_config(backends=[]))
    agent.create_backend("OBJ", params)
    size = 3 * 1024 * 1024 + 17
    block = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    agent.register_memory([(block.ctypes.data, size, 0, "")], "DRAM", backends=["OBJ"])
    agent.register_memory([(0, size, 1, "kv/layer0/block-1")], "OBJ", backends=["OBJ"])
    write = agent.initialize_xfer(
        "WRITE",
        agent.get_xfer_descs([(block.ctypes.data, size, 0)], "DRAM"),
        agent.get_xfer_descs([(0, size, 1)], "OBJ"),
        agent.name,
    )
    wrote = _wait(agent, write)
    offset, length = 123_457, 1_000_003
    out = np.zeros(length, np.uint8)
    agent.register_memory([(out.ctypes.data, length, 0, "")], "DRAM", backends=["OBJ"])
    read = agent.initialize_xfer(
        "READ",
        agent.get_xfer_descs([(out.ctypes.data, length, 0)], "DRAM"),
        agent.get_xfer_descs([(offset, length, 1)], "OBJ"),
        agent.name,
    )
    readback = _wait(agent, read)
    present = agent.query_memory(
        [(0, 0, 0, "kv/layer0/block-1"), (0, 0, 0, "kv/layer0/absent")], "OBJ", "OBJ"
    )
    sys.stdout.write(
        json.dumps(
            {
                "write": wrote,
                "read": readback,
                "exact": bool((out == block[offset : offset + length]).all()),
                "present": [p is not None for p in present],
                "sha256_len": size,
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
