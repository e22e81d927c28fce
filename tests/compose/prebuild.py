"""Build the compose test's images ahead of the test, while the rest of the set-up runs.

`scripts/bootstrap.sh test` runs `python3 -m tests.compose.prebuild STATE_DIR` in the background
right after apt: it starts dockerd when none runs (as the compose test does), builds the
registry-free base image and the kvtier image, and records the dockerd it started in
STATE_DIR/dockerd.pid, so that bootstrap stops it once the tests are over. The compose test
then finds a running engine and cached images instead of building them itself (about 2 minutes
of a cold CI run, mostly network and disk, overlapped with the installs, lint and type check).

Best effort: when anything fails it says so and exits 0 — the compose test does the same work
itself and reports the failure where it belongs. Standard library only (it runs before the
project's virtualenv exists).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.compose import docker_env

#: A compose project name of its own: building creates no containers, but never touch the test's.
PROJECT = "kvtier-prebuild"


def main(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        engine = docker_env.engine(state_dir)
        if engine.process is not None:
            (state_dir / "dockerd.pid").write_text(f"{engine.process.pid}\n")
        compose = docker_env.compose_command()
        image = docker_env.base_image()
        project = docker_env.Project(
            name=PROJECT, compose=compose, base_image=image,
            master_key_file=state_dir / "unused-master.key",
        )  # fmt: skip
        done = project.run("build", "pki", timeout_s=1200)
        if done.returncode != 0:
            raise AssertionError(done.stdout[-4000:] + done.stderr[-4000:])
    except (
        docker_env.DockerUnavailable,
        AssertionError,
        OSError,
        subprocess.SubprocessError,
    ) as exc:
        print(f"compose prebuild: not done ({exc}); the compose test builds itself", flush=True)  # noqa: T201
        return 0
    print(f"compose prebuild: images ready in {time.monotonic() - started:.0f} s", flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
