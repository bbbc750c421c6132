"""Atomic output: build results in a temporary sibling, rename at the end.

Every command that writes a directory or a file goes through these helpers, so an
interrupted or failed run never leaves a half-written result behind, and an existing
result is only replaced when the user asked for it (``overwrite=True``). Results get the
permissions ``mkdir``/``open`` would give them (0755/0644 under umask 022), not the private
0700/0600 of temporary files.

Example:
    >>> from poc_lora.outputs import atomic_output_dir
    >>> with atomic_output_dir("out/merged", overwrite=False) as tmp:  # doctest: +SKIP
    ...     (tmp / "adapter_config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
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
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the result should look like mkdir's
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
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
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; open() would honour the umask
        os.close(fd)
        write(Path(tmp))
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
