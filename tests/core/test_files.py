"""Files appear whole or not at all, stale temporaries are cleaned, corruption is caught."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memloc_tl.core.files import (
    CHECKSUMS,
    CorruptFileError,
    atomic_directory,
    atomic_write,
    atomic_write_text,
    read_json,
    remove_stale_temporaries,
    verify_checksums,
)
from tests.conftest import kill_9_when_ready

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: never a running process


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "scan.csv"
    atomic_write_text(target, "old\n")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("new, but only ha")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.csv"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    stale_file = tmp_path / f".report.html.tmp-{DEAD_PID}-abc"
    stale_dir = tmp_path / f".report.html.tmp-{DEAD_PID}-def"
    live = tmp_path / f".report.html.tmp-{os.getpid()}-ghi"  # a writer that still runs
    other = tmp_path / f".other.html.tmp-{DEAD_PID}-abc"  # another target's
    stale_file.write_text("partial")
    stale_dir.mkdir()
    (stale_dir / "x").write_text("partial")
    live.write_text("in progress")
    other.write_text("partial")
    atomic_write_text(target, "done")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["report.html", live.name, other.name])
    assert remove_stale_temporaries(tmp_path / "other.html") == [other]


def test_atomic_directory_checksums_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "saved"
    with atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"\x00\x01" * 100)
        (staging / "sub").mkdir()
        (staging / "sub" / "config.json").write_text("{}")
        assert not target.exists()  # nothing visible until complete
    assert json.loads((target / CHECKSUMS).read_text()).keys() == {
        "weights.bin",
        "sub/config.json",
    }
    verify_checksums(target, fix="rebuild", required=True)
    with pytest.raises(FileExistsError, match="not empty"), atomic_directory(target):
        raise AssertionError("never reached")
    # replace=True swaps in the new version whole
    with atomic_directory(target, replace=True) as staging:
        (staging / "weights.bin").write_bytes(b"new")
    assert (target / "weights.bin").read_bytes() == b"new"
    assert not (target / "sub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]

    # an interrupted fill leaves the old version and no temporary
    def interrupted_fill() -> None:
        with atomic_directory(target, replace=True) as staging:
            (staging / "weights.bin").write_bytes(b"newer")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_fill()
    assert (target / "weights.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_corruption_is_an_error_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "d") as staging:
        (staging / "weights.bin").write_bytes(bytes(range(256)))
        (staging / "manifest.json").write_text('{"a": 1}')
    directory = tmp_path / "d"
    weights = directory / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x10  # one flipped bit
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"weights\.bin.*rebuild=True"):
        verify_checksums(directory, fix="rebuild=True", required=True)
    (directory / "manifest.json").write_text('{"a": ')  # truncated
    with pytest.raises(CorruptFileError, match=r"manifest\.json is not valid JSON.*fix it"):
        read_json(directory / "manifest.json", fix="fix it")
    (directory / CHECKSUMS).unlink()
    with pytest.raises(CorruptFileError, match="cannot be checked"):
        verify_checksums(directory, fix="rebuild", required=True)
    verify_checksums(directory, fix="rebuild", required=False)  # optional: nothing to check


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from memloc_tl.core.files import atomic_write

    def slow(tmp: Path) -> None:
        with open(tmp, "w") as file:
            file.write("new content, ")
            file.flush()
            print("writing", flush=True)
            time.sleep(60)
            file.write("never finished")

    atomic_write(sys.argv[1], slow)
    """
)


def test_kill_9_during_a_write_leaves_the_old_file_and_the_next_write_recovers(
    tmp_path: Path,
) -> None:
    target = tmp_path / "scan.csv"
    atomic_write_text(target, "old\n")
    pid = kill_9_when_ready([sys.executable, "-c", WRITER, str(target)], "writing")
    assert target.read_text() == "old\n"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "scan.csv"]
    assert len(leftovers) == 1
    assert str(pid) in leftovers[0].name
    deadline = time.monotonic() + 10  # the killed pid is reaped by now
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.csv"]
