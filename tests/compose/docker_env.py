"""A Docker engine and a compose project for the compose tests.

`engine()` uses the running engine or starts `dockerd` itself (as root), and says why when
Docker cannot run here; `Project` runs docker-compose.yml under its own project name and
published ports, with Compose v2 (`docker compose ... --wait`) where it is installed and
Debian's docker-compose 1.29 otherwise (which has no --wait: the health checks are polled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE_SCRIPT = ROOT / "scripts" / "compose_base_image.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: The compose test's override: etcd and metadata probed often (the start's critical path).
FAST_HEALTH_FILE = Path(__file__).with_name("fast-health.yml")
#: The compose file's published ports, as the variables that move them.
PORT_VARIABLES = (
    "S3_PORT",
    "GATEWAY_PORT",
    "GATEWAY_CLIENT_PORT",
    "METADATA_PORT",
    "METADATA_CLIENT_PORT",
    "KVCACHE_1_CLIENT_PORT",
    "KVCACHE_1_DATAPLANE_PORT",
    "KVCACHE_2_CLIENT_PORT",
    "KVCACHE_2_DATAPLANE_PORT",
)
#: The containers' user (Dockerfile): the owner the services require of the master key.
CONTAINER_UID = 10001


class DockerUnavailable(Exception):
    """Docker cannot run on this machine; the message says why."""


@dataclasses.dataclass
class Engine:
    """A Docker engine that answers; `process` is the dockerd this test started, if any."""

    process: subprocess.Popen[bytes] | None
    log_path: Path | None

    def stop(self) -> None:
        """Stop the dockerd this test started (SIGTERM, then SIGKILL); idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _docker_answers() -> bool:
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def engine(log_dir: Path, start_timeout_s: float = 60.0) -> Engine:
    """The running Docker engine, or a dockerd started here (logging to log_dir).

    Raises DockerUnavailable (with the reason) when Docker is not installed, this is not root
    and no engine runs, or a started dockerd does not answer."""
    for tool in ("docker", "dockerd"):
        if shutil.which(tool) is None:
            raise DockerUnavailable(f"no {tool} on PATH (scripts/bootstrap.sh test installs it)")
    if _docker_answers():
        return Engine(process=None, log_path=None)
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker engine runs and starting dockerd needs root")
    log_path = log_dir / "dockerd.log"
    with log_path.open("wb") as log:
        # Leave the host's firewall and sysctls alone: without --iptables=false dockerd sets
        # iptables' FORWARD policy to DROP and loads br_netfilter, which cuts other bridges
        # (the fault suite's). Published ports still work (docker-proxy); builds that need the
        # network use the host's (docker-compose.yml: build.network).
        process = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-forward=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    started = Engine(process=process, log_path=log_path)
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _docker_answers():
            return started
        time.sleep(0.5)
    started.stop()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise DockerUnavailable(f"dockerd did not come up in {start_timeout_s:.0f} s:\n{tail}")


def compose_command() -> list[str]:
    """`docker compose` (v2) where installed, else Debian's `docker-compose` (1.29)."""
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
    )
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DockerUnavailable("neither `docker compose` nor docker-compose is installed")


def base_image() -> str:
    """The registry-free base image (scripts/compose_base_image.sh; cached once built)."""
    done = subprocess.run(
        ["bash", str(BASE_IMAGE_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"compose_base_image.sh failed:\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def free_ports(count: int) -> list[int]:
    """count distinct free ports: every socket stays bound until all are picked (one released
    before the next bind may come back, and two published ports then collide: seen in CI)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@dataclasses.dataclass
class Project:
    """docker-compose.yml run as project `name`, with its own host ports and master key."""

    name: str
    compose: list[str]
    base_image: str
    master_key_file: Path
    ports: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict(
            zip(PORT_VARIABLES, free_ports(len(PORT_VARIABLES)), strict=True)
        )
    )
    #: Override files applied over docker-compose.yml (`-f`), in order.
    overrides: tuple[Path, ...] = ()

    @property
    def v2(self) -> bool:
        return self.compose == ["docker", "compose"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({name: str(port) for name, port in self.ports.items()})
        env.update(
            COMPOSE_PROJECT_NAME=self.name,
            BASE_IMAGE=self.base_image,
            MASTER_KEY_FILE=str(self.master_key_file),
        )
        return env

    def run(
        self, *args: str, timeout_s: float = 300, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`<compose> -p NAME ARGS` from the repository root, output captured."""
        files = [f"--file={path}" for path in (COMPOSE_FILE, *self.overrides)]
        return subprocess.run(
            [*self.compose, *files, "-p", self.name, *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            input=input_text,
            timeout=timeout_s,
            check=False,
        )

    def write_master_key(self) -> None:
        """A fresh key, 0600 and owned by the containers' user as the services require."""
        self.master_key_file.write_text(os.urandom(32).hex() + "\n")
        self.master_key_file.chmod(0o600)
        os.chown(self.master_key_file, CONTAINER_UID, CONTAINER_UID)

    def up(self, timeout_s: float) -> None:
        """Build and start every service and return once all are healthy (the one-shot
        `pki` service: exited 0). AssertionError with the logs otherwise."""
        if self.v2:
            done = self.run("up", "--build", "--detach", "--wait", timeout_s=timeout_s)
            assert done.returncode == 0, done.stdout + done.stderr + self.logs()
            return
        # docker-compose 1.29 builds the one image once per service that names it (eleven
        # times): build it once, then start from it.
        started = time.monotonic()
        done = self.run("build", "pki", timeout_s=timeout_s)
        assert done.returncode == 0, done.stdout[-8000:] + done.stderr
        done = self.run("up", "--detach", timeout_s=timeout_s - (time.monotonic() - started))
        assert done.returncode == 0, done.stdout + done.stderr + self.logs()
        self.wait_healthy(timeout_s - (time.monotonic() - started))

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll the containers' health (what `up --wait` does in Compose v2)."""
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.states()
            waiting = {n: s for n, s in states.items() if s not in {"healthy", "exited 0"}}
            if states and not waiting:
                return
            failed = {n: s for n, s in waiting.items() if s.startswith(("exited", "dead"))}
            assert not failed, f"containers failed: {failed}\n{self.logs()}"
            time.sleep(1)
        raise AssertionError(f"not healthy in {timeout_s:.0f} s: {states}\n{self.logs()}")

    def states(self) -> dict[str, str]:
        """Service name → "healthy", "starting", "exited N", ... for every container."""
        ids = self._docker_ids("ps", "--all", "--filter", "label=com.docker.compose.oneoff=False")
        if not ids:
            return {}
        template = (
            "{{json .Config.Labels}}\t{{.State.Status}}\t{{.State.ExitCode}}\t"
            "{{if .State.Health}}{{.State.Health.Status}}{{end}}"
        )
        out = subprocess.run(
            ["docker", "inspect", "--format", template, *ids],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        states = {}
        for line in out.splitlines():
            labels, status, code, health = line.split("\t")
            service = json.loads(labels)["com.docker.compose.service"]
            states[service] = health or (f"exited {code}" if status == "exited" else status)
        return states

    def _docker_ids(self, *command: str) -> list[str]:
        """`docker COMMAND --quiet` of the project's own objects (containers, volumes,
        networks), by the label both compose versions put on them: the docker CLI answers in
        a fraction of the second that docker-compose 1.29 takes to start."""
        found = subprocess.run(
            ["docker", *command, "--quiet", "--filter",
             f"label=com.docker.compose.project={self.name}"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        return found.split()

    def leftovers(self) -> bool:
        """Whether any container, volume or network of the project exists (a killed run's)."""
        kinds = (("ps", "--all"), ("volume", "ls"), ("network", "ls"))
        return any(self._docker_ids(*kind) for kind in kinds)

    def container(self, service: str) -> str:
        """The container id of a service."""
        ids = self.run("ps", "-q", service, timeout_s=60).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def volume_file(self, volume: str, path: str) -> bytes:
        """A file of one of the project's named volumes, read through a throwaway container of
        the project's image (so it is read as the containers' user)."""
        done = subprocess.run(
            ["docker", "run", "--rm", "--network=none", "-v", f"{self.name}_{volume}:/v:ro",
             "kvtier:dev", "cat", f"/v/{path}"],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout

    def logs(self, tail: int = 60) -> str:
        """The last lines of every service's log (for failure messages)."""
        try:
            done = self.run("logs", "--no-color", f"--tail={tail}", timeout_s=120)
        except subprocess.TimeoutExpired:
            return "\n(compose logs timed out)"
        return "\n--- compose logs ---\n" + done.stdout[-20000:] + done.stderr[-2000:]

    def down(self) -> subprocess.CompletedProcess[str]:
        """Stop and remove every container, network and volume of the project."""
        return self.run("down", "--volumes", "--remove-orphans", "--timeout", "20", timeout_s=300)
