"""Atomic writes: a file or a folder appears under its name complete, or not at all.

Every folder that a later run reuses (a trained tokenizer, a pre-trained teacher, an extracted student) and every
record that says a step is done is written under a temporary name beside its destination and renamed when complete.
An interruption (Ctrl-C, SIGKILL, a full disk) therefore leaves the old state or nothing, never a half-written folder
that the next run would take for a finished one; the next write removes the leftover temporary folder.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file at; when the block completes, it becomes `path`.

    An exception in the block (Ctrl-C included) removes the temporary file and leaves `path` as it was. A process
    killed in the block leaves a hidden `.NAME.tmp-PID` file, which the next write to `path` removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename (readers never see half a file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """`data` as indented JSON at `path`, written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def is_empty_folder(path: str | os.PathLike) -> bool:
    """Whether `path` does not exist or is a folder with nothing in it."""
    path = Path(path)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; when the block completes, it becomes `path`.

    Args:
        path: the destination folder.
        replace: replace a `path` that holds files (the old folder is removed only once the new one is in place);
            without it, such a `path` raises `FileExistsError` before the block runs.

    An exception in the block removes the temporary folder and leaves `path` as it was. A process killed in the block
    leaves a hidden `.NAME.tmp-PID` (or `.NAME.old-PID`) folder, which the next write to `path` removes.
    """
    path = Path(path)
    if not replace and not is_empty_folder(path):
        raise FileExistsError(f"{path} exists and is not empty; it is left as it is (choose another folder).")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary files or folders of `path` (`.NAME.tmp-PID`, `.NAME.old-PID`) that a killed writer left."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for leftover in path.parent.glob(pattern):
            if not _process_alive(leftover.name.rsplit("-", 1)[-1]):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)


def _process_alive(pid: str) -> bool:
    """Whether a process with this id (as written in a temporary folder's name) is running."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


__all__ = ["atomic_file", "atomic_folder", "is_empty_folder", "write_json_atomic", "write_text_atomic"]
