"""Unit tests of node identity, the state-directory lock (kvtier.identity) and drive formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier import config, identity
from services.datanode import drives

# Tries to lock the directory in argv[1]; exits 3 with the ConfigError text when it is held.
_LOCK_CHILD = """
import sys
from pathlib import Path
from kvtier import config, identity
try:
    identity.lock_state_dir(Path(sys.argv[1]))
except config.ConfigError as exc:
    print(exc)
    sys.exit(3)
"""


def try_lock_in_child(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _LOCK_CHILD, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- node identity -------------------------------------------------------------------------------


def test_node_id_is_created_persisted_and_reloaded(tmp_path: Path) -> None:
    node_id = identity.load_or_create(tmp_path, "", "datanode")

    assert node_id.startswith("datanode-")
    assert json.loads((tmp_path / "node.json").read_text()) == {
        "node_id": node_id,
        "role": "datanode",
    }
    assert identity.load_or_create(tmp_path, "", "datanode") == node_id
    assert identity.load_or_create(tmp_path, node_id, "datanode") == node_id


def test_configured_id_is_kept_on_first_start(tmp_path: Path) -> None:
    assert identity.load_or_create(tmp_path, "dn-7", "datanode") == "dn-7"
    assert identity.load_or_create(tmp_path, "", "datanode") == "dn-7"


def test_fresh_directories_get_distinct_ids(tmp_path: Path) -> None:
    first = identity.load_or_create(tmp_path / "a", "", "kvcache")
    second = identity.load_or_create(tmp_path / "b", "", "kvcache")
    assert first != second


def test_mismatched_configured_id_is_rejected(tmp_path: Path) -> None:
    identity.load_or_create(tmp_path, "dn-1", "datanode")

    with pytest.raises(config.ConfigError, match="node_id: 'dn-2' differs from 'dn-1'") as info:
        identity.load_or_create(tmp_path, "dn-2", "datanode")
    assert "\n" not in str(info.value)
    assert identity.load_or_create(tmp_path, "", "datanode") == "dn-1"


@pytest.mark.parametrize("content", ["{not json", "{}"])
def test_corrupt_node_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "node.json").write_text(content)
    with pytest.raises(config.ConfigError):
        identity.load_or_create(tmp_path, "", "datanode")


def test_write_atomic_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.json"
    identity.write_atomic(target, b"old")
    identity.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


# --- state-directory lock ------------------------------------------------------------------------


def test_lock_is_refused_to_another_process(tmp_path: Path) -> None:
    with identity.lock_state_dir(tmp_path / "state"):
        child = try_lock_in_child(tmp_path / "state")

    assert child.returncode == 3, child.stderr
    assert "in use by another process" in child.stdout
    assert str(tmp_path / "state") in child.stdout


def test_lock_is_free_again_once_released(tmp_path: Path) -> None:
    identity.lock_state_dir(tmp_path).close()

    child = try_lock_in_child(tmp_path)

    assert child.returncode == 0, child.stdout + child.stderr


def test_lock_taken_twice_in_one_process_is_refused(tmp_path: Path) -> None:
    with identity.lock_state_dir(tmp_path), pytest.raises(config.ConfigError, match="in use"):
        identity.lock_state_dir(tmp_path)
    identity.lock_state_dir(tmp_path).close()  # free again once the holder closes it


def test_lock_creates_the_directory(tmp_path: Path) -> None:
    with identity.lock_state_dir(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / "LOCK").is_file()


def test_unlocked_directory_can_be_locked_by_a_child(tmp_path: Path) -> None:
    assert try_lock_in_child(tmp_path).returncode == 0


# --- drives ---------------------------------------------------------------------------------------


def read_format(path: Path) -> dict[str, object]:
    fmt = json.loads((path / drives.FORMAT_FILE).read_text())
    assert isinstance(fmt, dict)
    return fmt


def test_drive_is_formatted_once_and_reopened_with_the_same_id(tmp_path: Path) -> None:
    path = tmp_path / "drive0"

    first = drives.open_drive(path, "dn-1")

    assert read_format(path) == {
        "format_version": drives.FORMAT_VERSION,
        "drive_id": first.drive_id,
        "node_id": "dn-1",
    }
    before = (path / drives.FORMAT_FILE).read_bytes()
    again = drives.open_drive(path, "dn-1")
    assert again == first
    assert (path / drives.FORMAT_FILE).read_bytes() == before


def test_drives_get_distinct_ids(tmp_path: Path) -> None:
    opened = drives.open_drives([tmp_path / "d0", tmp_path / "d1", tmp_path / "d2"], "dn-1")
    assert len({d.drive_id for d in opened}) == 3
    assert [d.path for d in opened] == [tmp_path / "d0", tmp_path / "d1", tmp_path / "d2"]


def test_drive_of_another_node_is_refused(tmp_path: Path) -> None:
    drives.open_drive(tmp_path, "dn-1")

    with pytest.raises(config.ConfigError, match="belongs to node dn-1, not dn-2"):
        drives.open_drive(tmp_path, "dn-2")
    assert read_format(tmp_path)["node_id"] == "dn-1"


def test_same_drive_through_two_paths_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "drive0"
    drives.open_drive(real, "dn-1")
    alias = tmp_path / "alias"
    alias.symlink_to(real)

    with pytest.raises(config.ConfigError, match="listed twice"):
        drives.open_drives([real, alias], "dn-1")
    with pytest.raises(config.ConfigError, match="listed twice"):
        drives.open_drives([real, real], "dn-1")


@pytest.mark.parametrize(
    "content",
    ["", "{not json", '{"drive_id": "x", "node_id": "dn-1"}', '{"format_version": 1}'],
)
def test_corrupt_format_file_is_refused(tmp_path: Path, content: str) -> None:
    fmt_path = tmp_path / drives.FORMAT_FILE
    fmt_path.parent.mkdir(parents=True)
    fmt_path.write_text(content)

    with pytest.raises(config.ConfigError, match="unreadable") as info:
        drives.open_drive(tmp_path, "dn-1")
    assert "\n" not in str(info.value)
    assert fmt_path.read_text() == content  # a bad format is never overwritten


def test_format_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / drives.FORMAT_FILE).mkdir(parents=True)
    with pytest.raises(config.ConfigError, match="unreadable"):
        drives.open_drive(tmp_path, "dn-1")


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    fmt_path = tmp_path / drives.FORMAT_FILE
    fmt_path.parent.mkdir(parents=True)
    fmt_path.write_text(json.dumps({"format_version": 2, "drive_id": "x", "node_id": "dn-1"}))
    with pytest.raises(config.ConfigError, match="format version 2"):
        drives.open_drive(tmp_path, "dn-1")


@pytest.mark.parametrize("content", ["[]", "null", '"drive"', "3"])
def test_format_file_that_is_not_an_object_is_refused(tmp_path: Path, content: str) -> None:
    fmt_path = tmp_path / drives.FORMAT_FILE
    fmt_path.parent.mkdir(parents=True)
    fmt_path.write_text(content)
    with pytest.raises(config.ConfigError):
        drives.open_drive(tmp_path, "dn-1")


def test_usage_reports_capacity(tmp_path: Path) -> None:
    total, free = drives.open_drive(tmp_path, "dn-1").usage()
    assert total > 0
    assert 0 <= free <= total
