"""`kvtier cp` without a cluster: bad arguments are one line and exit 2 (nothing is asked of a
cluster); the progress line shows bytes, rate and time left. The round trip, the errors a cluster
gives and the denial are in tests/integration/test_console.py (they share its cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.cli import main as cli_main
from kvtier.cli import transfer


def _main(argv: list[str]) -> int:
    """The exit code `kvtier` ends with (argparse's errors exit from inside)."""
    try:
        return cli_main.main(argv)
    except SystemExit as exc:
        return int(str(exc.code))


@pytest.fixture
def local(tmp_path: Path) -> Path:
    path = tmp_path / "f.txt"
    path.write_bytes(b"hello")
    return path


@pytest.mark.parametrize(
    "make_args",
    [
        lambda d, f: [str(f), str(d / "g")],  # both local
        lambda d, f: ["s3://a/b", "s3://c/d"],  # both remote
        lambda d, f: [str(f), "s3://bucket-only"],
        lambda d, f: [str(f), "s3:///key"],
        lambda d, f: [str(d / "missing"), "s3://b/k"],
        lambda d, f: [str(d), "s3://b/k"],  # a folder
        lambda d, f: ["s3://b/k", str(d / "no" / "such" / "f")],
        lambda d, f: [str(f), "s3://b/k", "--part-size", "1MiB"],
        lambda d, f: [str(f), "s3://b/k", "--part-size", "lots"],
        lambda d, f: [str(f), "s3://b/k", "--no-such-flag"],
        lambda d, f: ["s3://b/", str(d)],  # a download names an object
        lambda d, f: [str(f), "s3://b"],  # no key and no slash
        lambda d, f: [str(f)],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    make_args: object, local: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert callable(make_args)
    argv = ["cp", *make_args(tmp_path, local), "--state-dir", str(tmp_path / "no-cluster")]
    assert _main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kvtier cp: error: "), line


def test_paths_parsed() -> None:
    assert transfer.parse_s3("s3://b/dir/k") == transfer.S3Path("b", "dir/k")
    assert transfer.parse_s3("./s3:/x") is None
    assert transfer.parse_s3("s3://b/") == transfer.S3Path("b", "")  # the bucket: uploads only
    for text in ("s3://b", "s3:///k"):
        with pytest.raises(transfer.BadArguments):
            transfer.parse_s3(text)


def test_no_cluster_is_one_line_exit_1(
    local: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["cp", str(local), "s3://b/k", "--state-dir", str(tmp_path)]
    assert _main(argv) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("kvtier cp: error: no running cluster")


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_progress_line_has_bytes_rate_and_eta() -> None:
    stream = _Stream()
    display = transfer.Display(stream, "upload", 4 << 20, quiet=False)  # type: ignore[arg-type]
    display.done_bytes = 1 << 20
    line = display.line()
    assert line.startswith("upload: [#####---------------]  25% 1.0 MiB of 4.0 MiB, ")
    assert "/s, ETA " in line
    display.done_bytes = 4 << 20
    display.finish()
    assert "100% 4.0 MiB of 4.0 MiB" in stream.text
    assert stream.text.endswith("ETA 0s\n")
    quiet = _Stream()
    transfer.Display(quiet, "upload", 1, quiet=True).finish()  # type: ignore[arg-type]
    assert quiet.text == ""
