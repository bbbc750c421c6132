"""Atomic output: build results in a temporary sibling, rename at the end.

Every command that writes a directory or a file goes through these helpers, so an
interrupted or failed run never leaves a half-written result behind, and an existing
result is only replaced when the user asked for it (``overwrite=True``). Results get the
permissions ``mkdir``/``open`` would give them (0755/0644 under umask 022, 0700/0600 under 077),
whatever the writer did: not the private 0700/0600 of temporary files, nor the 0600 that
safetensors gives every file it writes (:func:`follow_umask`, applied to every result before its
rename and by :class:`~poc_lora.trainer.NoisyAdamWTrainer` to every checkpoint).

Example:
    >>> from poc_lora.outputs import atomic_output_dir
    >>> with atomic_output_dir("out/merged", overwrite=False) as tmp:  # doctest: +SKIP
    ...     (tmp / "adapter_config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux
    ``/proc/self/status``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the permissions ``open`` and
    ``mkdir`` would give under the process umask: files ``0o666 & ~umask``, directories
    ``0o777 & ~umask``. The one place outputs get their modes, so a writer that picks its own
    (safetensors writes 0600, ``mkstemp`` 0600, ``mkdtemp`` 0700) does not decide them.
    Symbolic links are left alone.

    Example:
        >>> follow_umask("runs/a0/checkpoint-6")  # 0644 files, 0755 dirs under umask 022  # doctest: +SKIP
    """
    mask = current_umask()
    root = Path(path)
    if root.is_symlink():
        return
    if not root.is_dir():
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            item = Path(parent) / name
            if not item.is_symlink():
                os.chmod(item, (0o777 if name in dirs else 0o666) & ~mask)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file (hex), streamed through one reused 1 MiB buffer (no per-chunk allocations,
    which fragmented the heap by tens of MB; a 15 GB merged model costs no more memory than a
    small adapter); hashlib releases the GIL, so a thread overlaps it."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(chunk))
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def check_output_path(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``output`` as a Path, or raise :class:`OutputError` if it exists and
    ``overwrite`` is false. Call it before any expensive work so the user learns early."""
    out = Path(output)
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``output``; on success it becomes ``output``.

    On any exception the temporary directory is removed and ``output`` is left as it was.
    With ``overwrite`` an existing ``output`` is replaced only after the new one is complete.
    """
    out = check_output_path(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp made it 0700, safetensors its files 0600: the result looks like mkdir's
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists() and not overwrite:
        # Another process created it while this one was writing: never replace its result
        # under a reader's feet without being asked to.
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"output {out} was created by another process while this one was writing it; "
                          "pass --overwrite (overwrite=True) to replace it")
    if out.exists():
        # Move the old result aside first: a crash between the two renames leaves the
        # old result recoverable under its .old name rather than nothing at all.
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> Path:
    """Create ``path`` by calling ``write(tmp)`` on a temporary file beside it, then renaming.

    The one implementation of an atomic file write: the temporary file gets the permissions
    ``open`` would give (umask), is removed on any error, and ``path`` is only ever replaced by a
    complete file. ``suffix`` ends the temporary name (writers that pick the format from it,
    such as matplotlib's ``savefig``, need ``.png``).

    Example:
        >>> atomic_write("out/fig.png", lambda tmp: fig.savefig(tmp), suffix=".png")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    try:
        os.close(fd)
        write(Path(tmp))
        follow_umask(tmp)  # mkstemp made it 0600 (and a writer may recreate it); open() would honour the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory + rename."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def staged_files(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``directory``; on success each file in it is
    renamed into ``directory`` (created if needed; other files there are kept), on error it is
    removed. For outputs that share a directory with other files (a training run's adapter
    beside its checkpoints); write the file that marks completion after this block.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staged-", dir=out.parent))
    try:
        yield tmp
        for item in tmp.iterdir():
            follow_umask(item)  # e.g. safetensors' 0600
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (the project's machine-readable format), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
