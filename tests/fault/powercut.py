"""Simulated power loss for the fault harness: drives whose unsynced writes can be discarded.

A power-cut drive is an ext4 filesystem on a loop device over an image file in RAM
(`/dev/shm/kvtft-<pid>-<node>-d<i>.img`), mounted where the harness mounts a drive. `cut()`
freezes the datanode (SIGSTOP), shuts every one of its filesystems down with
`FS_IOC_SHUTDOWN(NOLOGFLUSH)` (the ioctl xfstests' `godown` uses to simulate a crash: the
journal is aborted without being flushed and nothing more reaches the device; dirty pages in the
page cache are dropped at unmount), then SIGKILLs it. The image then holds exactly what had
reached the "device": what was fsynced / fdatasynced / syncfs'ed (a sync forces a journal
commit and waits for it), plus whatever the kernel had written back on its own before the cut
(vm.dirty_expire_centisecs, 30 s here; a real power loss may keep that too). The filesystem is
mounted with `commit=600` (no timed journal commits) and `noauto_da_alloc` (no data flush on
replace-by-rename), so almost nothing unsynced survives: the adversarial case.
`power_on()` unmounts, detaches the loop device, attaches a new one and mounts it (ext4 replays
its journal, as at boot), and gives the datanode's next start a new boot id (a bind mount over
/proc/sys/kernel/random/boot_id in a mount namespace of its own: a power loss is always
followed by a reboot, and the datanode's index recovery keys on the boot id).

Why this and not something else here: the kernel has no device mapper (no dm-log-writes or
dm-flakey), there is no FUSE library in the image, and an LD_PRELOAD shim would have to model
directory-entry durability (renames, directory fsyncs) itself, which is the very thing under
test. Drive mounts are made on a shared bind mount of their mount point, so the copies that
`ip netns exec` makes in every later node's mount namespace are slaves and go away with the
unmount; `power_on()` checks that the old loop device was really released (else a mount would
reuse the shut-down superblock instead of replaying the image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import signal
import struct
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.fault import harness

IMAGE_DIR = Path("/dev/shm")
PREFIX = "kvtft-"
FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
SHUTDOWN_NOLOGFLUSH = 2
MOUNT_OPTIONS = "noauto_da_alloc,commit=600"


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout.strip()


def missing() -> str:
    """Why this machine cannot cut power on a drive, or ''."""
    for tool in ("losetup", "mkfs.ext4", "unshare"):
        if not any(Path(d, tool).exists() for d in os.environ.get("PATH", "").split(":")):
            return f"needs {tool}"
    if not Path("/dev/loop-control").exists():
        return "needs loop devices (/dev/loop-control)"
    with open("/proc/filesystems") as filesystems:
        if not any(line.split()[-1] == "ext4" for line in filesystems if line.strip()):
            return "needs ext4"
    return ""


@dataclasses.dataclass
class PowerDrive:
    """One drive: ext4 on a loop device over an image in RAM, mounted at mountpoint."""

    image: Path
    mountpoint: Path
    size_bytes: int
    loop: str = ""

    def create(self) -> None:
        """Make the image and filesystem; mount it (on a shared bind mount of mountpoint)."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with self.image.open("wb") as image:
            image.truncate(self.size_bytes)
        _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
             str(self.image))  # fmt: skip
        _run("mount", "--bind", str(self.mountpoint), str(self.mountpoint))
        _run("mount", "--make-shared", str(self.mountpoint))
        self._attach_and_mount()

    def _attach_and_mount(self) -> None:
        self.loop = _run("losetup", "--find", "--show", str(self.image))
        _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, self.loop, str(self.mountpoint))
        self.mountpoint.chmod(0o700)

    def shut_down(self) -> None:
        """The power cut: nothing written from now on reaches the image."""
        fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
        finally:
            os.close(fd)

    def remount(self) -> None:
        """Unmount (dropping the dirty pages), detach, attach anew and mount: the journal
        replays from the image as at boot."""
        self._unmount_fs()
        self._attach_and_mount()

    def _unmount_fs(self) -> None:
        if not self.loop:
            return
        _run("umount", str(self.mountpoint))
        _run("losetup", "-d", self.loop)
        backing = Path(f"/sys/block/{Path(self.loop).name}/loop/backing_file")
        deadline = time.monotonic() + 10
        while backing.exists():  # still held: another mount namespace kept a copy
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.loop} still held after umount: {_holders(self.loop)}")
            time.sleep(0.05)
        self.loop = ""

    def close(self) -> None:
        """Unmount, detach, remove the image (idempotent; the node must be stopped)."""
        with contextlib.suppress(AssertionError):
            self._unmount_fs()
        subprocess.run(["umount", str(self.mountpoint)], check=False, capture_output=True)
        self.image.unlink(missing_ok=True)

    def files(self) -> dict[str, int]:
        """Relative path -> size of every file under objects/ and .kvtier/ (what the datanode
        wrote, as the page cache or, after remount(), as the image has it)."""
        found = {}
        for root, _dirs, names in os.walk(self.mountpoint):
            for name in names:
                path = Path(root, name)
                with contextlib.suppress(OSError):
                    found[str(path.relative_to(self.mountpoint))] = path.stat().st_size
        return found


def _holders(loop: str) -> str:
    with open("/proc/self/mountinfo") as info:
        return "; ".join(line.strip() for line in info if loop in line) or "no mount here"


def image_path(node: str, index: int) -> Path:
    """Where drive index of node keeps its image (the pid names the owner, for cleanup)."""
    return IMAGE_DIR / f"{PREFIX}{os.getpid()}-{node}-d{index}.img"


@dataclasses.dataclass(slots=True)
class Cut:
    """What one power cut did to a node's drives (files as the process saw them, then as the
    image kept them)."""

    before: dict[str, dict[str, int]]
    after: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def discarded(self, pattern: str = r"(^|/)meta$") -> int:
        """Files matching pattern that were gone or shorter after the cut."""
        matcher = re.compile(pattern)
        count = 0
        for drive, files in self.before.items():
            kept = self.after.get(drive, {})
            count += sum(
                1 for p, size in files.items() if matcher.search(p) and kept.get(p, -1) < size
            )
        return count

    def count(self, pattern: str = r"(^|/)meta$") -> int:
        """Files matching pattern before the cut."""
        matcher = re.compile(pattern)
        return sum(1 for files in self.before.values() for p in files if matcher.search(p))


def cut(cluster: harness.FaultCluster, node: str) -> Cut:
    """Cut node's power: freeze it, shut its filesystems down unflushed, SIGKILL it."""
    drives = cluster.power_drives[node]
    cluster.signal(node, signal.SIGSTOP)
    result = Cut(before={str(d.mountpoint): d.files() for d in drives})
    for drive in drives:
        drive.shut_down()
    cluster.signal(node, signal.SIGKILL)
    return result


def cut_all(cluster: harness.FaultCluster, nodes: list[str]) -> dict[str, Cut]:
    """Cut the power of several nodes at once (a rack or the whole cluster): every one frozen
    first, then every filesystem shut down, then every one SIGKILLed, so that none goes on
    writing while another is already cut."""
    for node in nodes:
        cluster.signal(node, signal.SIGSTOP)
    results = {
        node: Cut(before={str(d.mountpoint): d.files() for d in cluster.power_drives[node]})
        for node in nodes
    }
    for node in nodes:
        for drive in cluster.power_drives[node]:
            drive.shut_down()
    for node in nodes:
        cluster.signal(node, signal.SIGKILL)
    return results


def power_on(cluster: harness.FaultCluster, node: str, result: Cut) -> None:
    """Bring the drives back from their images (journal replay), a new boot id, and start the
    node; returns once the cluster is ready. Fills result.after."""
    _reboot(cluster, node, result)
    cluster.restart(node)


def power_on_all(cluster: harness.FaultCluster, results: dict[str, Cut]) -> None:
    """power_on of several nodes cut together: all drives back, then all nodes started, then
    the wait for a ready cluster."""
    for node, result in results.items():
        _reboot(cluster, node, result)
    cluster.restart_all(list(results))


def _reboot(cluster: harness.FaultCluster, node: str, result: Cut) -> None:
    for drive in cluster.power_drives[node]:
        drive.remount()
        result.after[str(drive.mountpoint)] = drive.files()
    boot_id = cluster.base / f"boot_id-{node}"
    boot_id.write_text(f"{uuid.uuid4()}\n")
    cluster.boot_ids[node] = boot_id


def reboot_argv(boot_id: Path) -> list[str]:
    """The command prefix that runs a program seeing boot_id's content as the boot id."""
    script = 'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"'
    return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, str(boot_id)]


def cleanup_stale() -> None:
    """Detach the loop devices and remove the images of power-cut drives whose owner is gone."""
    from tests.fault import netns

    for image in IMAGE_DIR.glob(f"{PREFIX}*.img"):
        try:
            owner = int(image.name[len(PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if netns.pid_alive(owner) and owner != os.getpid():
            continue
        listing = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                                 timeout=30, check=False).stdout  # fmt: skip
        for line in listing.splitlines():
            loop = line.split(":")[0]
            with open("/proc/self/mountinfo") as info:
                points = [ln.split()[4] for ln in info if f" {loop} " in ln]
            for point in points:
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
        image.unlink(missing_ok=True)
