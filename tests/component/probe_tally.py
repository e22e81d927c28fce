"""What the acceptance probes found (tests/component/test_probe.py), and how a reply is judged.

`Probing` is the module's world with the state digest taken before the probes; `Tally` holds one
`Result` per probe. A result's problem starts with ACCEPTED when the probe got in: a call went
through that names a resource only tenant A may use, or a reply (or bytes landed in a buffer)
holds one of A's canaries (`World.canaries`: names, ids and the first bytes of A's data), or a
request naming nothing of A's found something (`nothing_of_a`). Server errors and probes that
did not test what they meant to (a control refused, B's own token refused) are problems too.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc
from google.protobuf import message

from kvtier import authz, security
from kvtier.proto.common.v1 import common_pb2
from kvtier.proto.kvcache.v1 import kvcache_pb2
from tests.component import harness, probe_cluster, probe_rpc, probe_state

A_NO_CREDENTIAL = "(a) no credential"
B_TENANT_ON_PRIVILEGED = "(b) tenant user on service/admin RPCs"
C_B_ON_A = "(c) tenant B on tenant A's resources"
D_S3 = "(d) S3 without a valid credential, or as tenant B"
CONTROL = "control: tenant A on its own resources"
#: Probes in flight at once (2 cores shared: more only queues in the servers).
CONCURRENCY = 12
SERVER_ERRORS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@dataclasses.dataclass
class Result:
    """One probe."""

    category: str
    target: str
    door: str
    variant: str
    outcome: str
    #: Empty when the outcome is what the category requires; starts with ACCEPTED when the
    #: probe got in (A's data returned or the call went through).
    problem: str = ""

    def line(self) -> str:
        return f"{self.target} [{self.door}; {self.variant}] -> {self.outcome}: {self.problem}"


@dataclasses.dataclass
class Tally:
    """Every probe of the module, by category."""

    results: list[Result] = dataclasses.field(default_factory=list)

    def record(
        self, category: str, target: str, door: str, variant: str, outcome: str, problem: str = ""
    ) -> None:
        self.results.append(Result(category, target, door, variant, outcome, problem))

    def problems(self, *categories: str, since: int = 0) -> list[str]:
        """The problems of results[since:] in categories, one line each."""
        found = self.results[since:]
        return [r.line() for r in found if r.category in categories and r.problem]

    def summary(self) -> list[str]:
        """Probes, accepted and other problems per category."""
        lines = []
        for category in (A_NO_CREDENTIAL, B_TENANT_ON_PRIVILEGED, C_B_ON_A, D_S3, CONTROL):
            mine = [r for r in self.results if r.category == category]
            accepted = sum(r.problem.startswith("ACCEPTED") for r in mine)
            other = sum(bool(r.problem) for r in mine) - accepted
            lines.append(f"{category}: {len(mine)} probes, {accepted} accepted, {other} other")
        return lines


@dataclasses.dataclass
class Probing:
    """The module's world, its state before the probes, and what the probes found."""

    world: probe_cluster.World
    before: probe_state.Snapshot
    served: dict[str, set[str]]
    tally: Tally = dataclasses.field(default_factory=Tally)
    #: Put ids of B's own gRPC puts (B's namespace), aborted once the gRPC probes are done.
    b_pending_puts: list[int] = dataclasses.field(default_factory=list)

    def methods_of(self, node: harness.Running) -> Iterator[probe_rpc.Method]:
        """Every RPC node serves."""
        for name, methods in probe_rpc.services().items():
            if name in self.served[node.info.node_id]:
                yield from methods

    @property
    def targets(self) -> probe_rpc.Targets:
        """Tenant A's resources, as requests name them."""
        w = self.world
        return probe_rpc.Targets(
            tenant=w.a.tenant,
            bucket=w.bucket,
            storage=w.storage,
            key=next(k for k, v in w.objects.items() if v),
            upload_key=w.upload_key,
            upload_id=w.upload_id,
            part_etag=w.part_etag,
            open_put_id=w.open_put_id,
            namespace=w.namespace,
            kv_keys=tuple(w.blocks),
            kv_put_ids=tuple(w.kv_put_ids),
            kv_lease_ids=tuple(w.kv_lease_ids),
            access_key=w.a.access_key,
            drive_id=w.drive_id,
            principal=w.a_principal,
        )

    def names_a(self, request: bytes) -> bool:
        """Whether a request names a resource only tenant A's credentials may use (not a
        namespace or key name: B naming those without a tenant names its own)."""
        w = self.world
        owned = [
            w.a.tenant,
            w.a.access_key,
            w.bucket,
            w.kv_bucket,
            w.storage,
            w.upload_id,
            w.open_put_id,
        ]
        return any(s.encode() in request for s in owned)

    def leaked(self, reply: bytes) -> list[bytes]:
        """Canaries of tenant A's in a reply."""
        return [c for c in self.world.canaries() if c in reply]


async def bounded(jobs: list[Coroutine[Any, Any, None]]) -> None:
    """Run jobs, CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def run(job: Coroutine[Any, Any, None]) -> None:
        async with gate:
            await job

    await asyncio.gather(*(run(job) for job in jobs))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One way into a node, and the status every RPC called through it must end with."""

    door: probe_rpc.Door
    expected: grpc.StatusCode
    chan: grpc.aio.Channel | None = None
    #: Instead of chan: a new channel with this security to the node's service port per probe
    #: (each probe its own TLS handshake).
    fresh: security.ClientSecurity | None = None
    metadata: tuple[tuple[str, str], ...] = ()


async def expect(
    probing: Probing,
    category: str,
    node: harness.Running,
    entry: Entry,
    method: probe_rpc.Method,
    variant: str,
    request: message.Message,
) -> None:
    """Call method through entry and record whether it ended as the entry requires."""
    if entry.fresh is not None:
        async with probe_rpc.channel(node.address, entry.fresh) as own:
            code, _ = await probe_rpc.invoke(own, method, request, entry.metadata)
    else:
        assert entry.chan is not None
        code, _ = await probe_rpc.invoke(entry.chan, method, request, entry.metadata)
    problem = ""
    if code != entry.expected:
        problem = f"expected {entry.expected.name}"
        if code == grpc.StatusCode.OK:
            problem = f"ACCEPTED ({problem})"
    target = f"{node.info.node_id} {authz.path(method)}"
    probing.tally.record(category, target, entry.door.value, variant, code.name, problem)


async def token_of(user: probe_cluster.User, world: probe_cluster.World) -> str:
    """A session token of user (from the metadata service's client port)."""
    source = security.token_source(user.security, world.cluster.metadata.info.client_address)
    return await source.token()


#: Reply fields that count what a request found or changed: B naming nothing must find nothing.
_COUNTS = ("count", "dram_count", "durable_count", "deleted", "pinned", "unpinned", "touched")


def nothing_of_a(probing: Probing, method: str, reply: message.Message) -> str:
    """Why a reply B got while naming nothing of A's shows something (empty: it shows none)."""
    fields = dict((f.name, v) for f, v in reply.ListFields())
    for name in _COUNTS:
        if fields.get(name):
            return f"{name}={fields[name]}"
    if any(fields.get("present", ())) or any(fields.get("in_dram", ())):
        return "a key of B's empty namespace is present"
    if fields.get("entries"):
        return "B's empty namespace lists keys"
    if kvcache_pb2.ITEM_STATUS_OK in fields.get("statuses", ()):
        return "a put id of A's committed"
    ok_items = [i for i in fields.get("items", ()) if i.status == kvcache_pb2.ITEM_STATUS_OK]
    if ok_items and method != "BatchPut":  # a put into B's own namespace is B's right
        return "an item of B's empty namespace was found"
    tenant = fields.get("tenant")
    if isinstance(reply, kvcache_pb2.StatsResponse) and tenant != probing.world.b.tenant:
        return f"stats of tenant {tenant!r}"
    if isinstance(reply, common_pb2.OpenDataPlaneResponse) and not reply.principal.startswith(
        probing.world.b.tenant + "/"
    ):
        return f"a session for {reply.principal}"
    return ""


def judge_reply(probing: Probing, method: str, request: bytes, reply: message.Message) -> str:
    """The problem with a reply B got (empty: it holds nothing of A's)."""
    leaked = probing.leaked(reply.SerializeToString())
    if leaked:
        return f"ACCEPTED: the reply holds A's {leaked[0]!r}"
    # A data-plane Stats call answers for the session's tenant whatever it names: B's own.
    own: Any = reply
    scoped_to_b = (
        "tenant" in reply.DESCRIPTOR.fields_by_name and own.tenant == probing.world.b.tenant
    )
    if probing.names_a(request) and not scoped_to_b:
        return "ACCEPTED: a call naming A's resources went through"
    why = nothing_of_a(probing, method, reply)
    return f"ACCEPTED: {why}" if why else ""


def judge_b(
    probing: Probing,
    method: probe_rpc.Method,
    request: message.Message,
    code: grpc.StatusCode,
    replies: list[message.Message],
) -> str:
    """The problem with what B got over gRPC (empty: refused, or answered with nothing of
    A's)."""
    if code in SERVER_ERRORS:
        return f"server error {code.name}"
    rule = authz.rule_of(method)
    if code == grpc.StatusCode.UNAUTHENTICATED and not (rule is not None and rule.public):
        return "a bad probe: B's own token was refused"  # (public: it checks its own request)
    if code != grpc.StatusCode.OK:
        return ""
    raw = request.SerializeToString()
    problems = [judge_reply(probing, method.name, raw, reply) for reply in replies]
    if not replies and probing.names_a(raw):
        problems.append("ACCEPTED: a call naming A's resources went through")
    return next((p for p in problems if p), "")
