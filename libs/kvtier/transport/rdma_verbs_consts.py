"""The verbs constants the rdma transport uses, as plain enums and integers.

They are the values of the enums in rdma-core's `<infiniband/verbs.h>` (a stable ABI), checked
against `pyverbs.enums` by the tests wherever pyverbs imports; nothing here imports pyverbs.
`kvtier.transport.rdma_logic` computes with them and `kvtier.transport.rdma_device` hands them
to pyverbs.
"""

from __future__ import annotations

import enum
from typing import Final


class WcStatus(enum.IntEnum):
    """enum ibv_wc_status."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21


class QpState(enum.IntEnum):
    """enum ibv_qp_state."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    SQD = 4
    SQE = 5
    ERR = 6


class QpAttrMask(enum.IntFlag):
    """enum ibv_qp_attr_mask (the attributes a modify applies)."""

    STATE = 1 << 0
    ACCESS_FLAGS = 1 << 3
    PKEY_INDEX = 1 << 4
    PORT = 1 << 5
    AV = 1 << 7
    PATH_MTU = 1 << 8
    TIMEOUT = 1 << 9
    RETRY_CNT = 1 << 10
    RNR_RETRY = 1 << 11
    RQ_PSN = 1 << 12
    MAX_QP_RD_ATOMIC = 1 << 13
    MIN_RNR_TIMER = 1 << 15
    SQ_PSN = 1 << 16
    MAX_DEST_RD_ATOMIC = 1 << 17
    DEST_QPN = 1 << 20


class Access(enum.IntFlag):
    """enum ibv_access_flags (MR and QP access)."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4


WR_RDMA_WRITE: Final = 0  # enum ibv_wr_opcode
WR_RDMA_READ: Final = 4
SEND_SIGNALED: Final = 2  # enum ibv_send_flags
QPT_RC: Final = 2  # enum ibv_qp_type
PORT_ACTIVE: Final = 4  # enum ibv_port_state
LINK_LAYER_INFINIBAND: Final = 1
LINK_LAYER_ETHERNET: Final = 2
GID_TYPE_IB_ROCE_V1: Final = 0  # enum ibv_gid_type_sysfs (what query_gid_type returns)
GID_TYPE_ROCE_V2: Final = 1
MTU_MIN: Final = 1  # enum ibv_mtu: 1 = 256 bytes ... 5 = 4096 bytes
MTU_MAX: Final = 5

PSN_MASK: Final = (1 << 24) - 1
QPN_MASK: Final = (1 << 24) - 1
GID_BYTES: Final = 16
