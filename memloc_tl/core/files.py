"""Files appear complete or not at all, and are checked when read back.

One helper for every file and directory memloc-tl writes (:func:`atomic_write`,
:func:`atomic_directory`): the content goes to a temporary sibling named after the target and
the writing process, is flushed to disk and renamed onto the target, so a reader sees the old
version or the new one, never a partial one. A writer killed before the rename leaves its
temporary behind; the next write of the same target removes it (its process is gone).

Directories carry ``checksums.json``, the SHA-256 of every other file, written last;
:func:`verify_checksums` compares them on load, so a truncated or bit-flipped file is an error
naming the file, not a model that silently computes NaN.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

CHECKSUMS = "checksums.json"


class CorruptFileError(ValueError):
    """A file memloc-tl wrote does not read back as written (truncated, changed, unparsable)."""


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries of ``path`` left by writers that no longer run; returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = _temp_prefix(path)
    for candidate in path.parent.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, flush it to disk, then rename it onto ``path``.

    The temporary file lies in the same directory (so the rename is atomic) and is removed if
    ``write`` raises or the process is interrupted before the rename; readers see the old file
    or the new one, never a partial one. The file gets the usual permissions (umask), not the
    private ones of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}-")
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        _raise_as_os_error(error, path)
        raise
    return path


def _raise_as_os_error(error: BaseException, path: Path) -> None:
    """A write error of safetensors (a full disk, say) becomes the ``OSError`` others give."""
    if type(error).__name__ == "SafetensorError":
        raise OSError(
            f"could not write {path} ({error}): is the disk full or read-only?"
        ) from error


def share_like_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the umask's permissions.

    Libraries write some files private (safetensors: mode 0600); a cache shared by a group
    must be readable by the group as the umask says, like any other file.
    """
    umask = _umask()
    os.chmod(directory, 0o777 & ~umask)
    for item in directory.rglob("*"):
        if item.is_symlink():
            continue
        executable = item.is_dir() or bool(item.stat().st_mode & 0o111)
        os.chmod(item, (0o777 if executable else 0o666) & ~umask)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Fill a temporary directory (yielded), then checksum it and rename it onto ``path``.

    Args:
        path: the directory to create.
        replace: replace an existing ``path``; otherwise an existing non-empty ``path`` is a
            ``FileExistsError`` (raised before anything is written).

    The directory gets the usual permissions (umask; group-readable in a shared cache), and
    :data:`CHECKSUMS` is written last. On an error or interrupt the temporary is removed.
    """
    path = Path(path)
    if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}-"))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        write_checksums(staging)
        share_like_umask(staging)
        if path.is_dir():
            # Move the old version aside first: a rename onto a non-empty directory fails.
            old = Path(
                tempfile.mkdtemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}-")
            )
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _raise_as_os_error(error, path)
        raise


def save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file``, called inside :func:`atomic_write` or
    :func:`atomic_directory`: they turn its ``SafetensorError`` (a full disk, an unwritable path)
    into the ``OSError`` any other write gives, naming the target."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over named tensors: names, dtypes, shapes and bytes, in name order.

    What a saved weight edit records and checks on load (safetensors itself has no checksum).
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | os.PathLike[str]) -> Path:
    """Record the SHA-256 of every file under ``directory`` in its :data:`CHECKSUMS`."""
    directory = Path(directory)
    sums = {
        str(file.relative_to(directory)): file_sha256(file)
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.name != CHECKSUMS
    }
    return atomic_write_text(directory / CHECKSUMS, json.dumps(sums, indent=1))


def verify_checksums(directory: str | os.PathLike[str], *, fix: str, required: bool) -> None:
    """Check every file recorded in ``directory``'s :data:`CHECKSUMS`.

    Args:
        directory: the directory.
        fix: what the user should do about a mismatch (ends the error message).
        required: a missing :data:`CHECKSUMS` is an error (else nothing is checked).

    Raises:
        CorruptFileError: a file is missing, or its content differs from when it was written.
    """
    directory = Path(directory)
    recorded = directory / CHECKSUMS
    if not recorded.is_file():
        if required:
            raise CorruptFileError(
                f"{recorded} is missing, so {directory} cannot be checked; {fix}"
            )
        return
    sums = read_json(recorded, fix=fix)
    for name, expected in sums.items():
        file = directory / name
        if not file.is_file():
            raise CorruptFileError(f"{file} is missing; {fix}")
        if file_sha256(file) != expected:
            raise CorruptFileError(f"{file} differs from when it was written (corrupted); {fix}")


def read_json(path: str | os.PathLike[str], *, fix: str) -> Any:
    """``json.loads`` of a file memloc-tl wrote, with an error naming the file and the fix."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error}); {fix}") from error
