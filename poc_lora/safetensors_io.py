"""Safetensors files, read lazily and written tensor by tensor (adapters, base model shards).

:class:`TensorFile` gives read-only, lazy access to one ``.safetensors`` file (or a legacy
weights-only ``.bin`` pickle, loaded with ``torch.load(weights_only=True)``); every failure is an
:class:`~poc_lora.errors.AdapterError` naming the file. :class:`SafetensorsStreamWriter` writes a
safetensors file in a fixed order of tensors, so a merged adapter or model never sits in memory
as a whole. Neither knows what LoRA is: :mod:`poc_lora.adapters` parses adapters on top of them.

Example:
    >>> from poc_lora.safetensors_io import TensorFile
    >>> tf = TensorFile(Path("runs/adapter_0/adapter_model.safetensors"), "adapter 0")  # doctest: +SKIP
    >>> tf.read(tf.keys()[0]).shape  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from .errors import AdapterError

# safetensors dtype tags <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


@dataclass
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file (safetensors only)
    end: int


class TensorFile:
    """Lazy, read-only access to the tensors of one safetensors (or weights-only ``.bin``) file.

    Safetensors data is read with plain positioned reads into a fresh buffer rather than
    through ``safe_open``'s memory map: every page a map touches stays in this process's
    resident set until the map is closed, so reading all inputs of a merge through open maps
    would make peak RSS as large as the inputs. ``safe_open`` still validates the file once.
    """

    def __init__(self, path: Path, label: str):
        self.path = path
        self.label = label
        self.info: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._state: dict[str, torch.Tensor] | None = None
        self._fh = None
        if path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_bin()

    def _open_safetensors(self) -> None:
        try:
            with safe_open(str(self.path), framework="pt"):
                pass  # validates header, offsets and dtypes
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except Exception as exc:  # SafetensorError, JSON errors, short files
            raise AdapterError(f"{self.label}: {self.path} is not a valid safetensors file ({exc})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        for key, meta in header.items():
            if meta["dtype"] not in ST_DTYPES:
                raise AdapterError(f"{self.label}: tensor {key} in {self.path} has unsupported dtype {meta['dtype']}")
            s, e = meta["data_offsets"]
            self.info[key] = TensorInfo(ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), base + s, base + e)
        self._fh = open(self.path, "rb")

    def _open_bin(self) -> None:
        # weights_only=True: the unpickler only builds tensors and plain containers, so a
        # pickle that would run code raises before any of it runs. mmap keeps it lazy.
        state = None
        for mmap in (True, False):  # mmap needs the zip format; legacy pickles do not have it
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except pickle.UnpicklingError as exc:
                raise AdapterError(
                    f"{self.label}: {self.path} was refused by torch.load(weights_only=True): it contains "
                    f"objects other than tensors (possibly code that would run on unpickling), so it was "
                    f"not loaded. Convert it to safetensors if you trust its origin. ({str(exc).splitlines()[0]})"
                ) from None
            except RuntimeError as exc:
                if mmap and "mmap" in str(exc):
                    continue
                raise AdapterError(f"{self.label}: cannot read {self.path}: {exc}") from None
            except Exception as exc:
                raise AdapterError(f"{self.label}: cannot read {self.path}: {exc}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{self.label}: {self.path} does not hold a flat dict of tensors")
        self._state = state
        for key, t in state.items():
            self.info[key] = TensorInfo(t.dtype, tuple(t.shape), 0, 0)

    def keys(self) -> list[str]:
        return list(self.info)

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a fresh CPU tensor (its own memory, safe to modify)."""
        if self._state is not None:
            return self._state[key].clone()
        ti = self.info[key]
        buf = torch.empty(ti.end - ti.start, dtype=torch.uint8)
        self._fh.seek(ti.start)
        if buf.numel() and self._fh.readinto(memoryview(buf.numpy())) != buf.numel():
            raise AdapterError(f"{self.label}: {self.path} is truncated at tensor {key}")
        return buf.view(ti.dtype).reshape(ti.shape)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read ``key`` straight into the contiguous tensor ``out`` (same dtype and size)."""
        ti = self.info[key]
        if not out.is_contiguous() or out.dtype != ti.dtype or out.numel() != math.prod(ti.shape):
            raise ValueError(f"read_into({key}): target does not match {ti.dtype} {ti.shape}")
        if self._state is not None:
            out.copy_(self._state[key].reshape(out.shape))
            return
        self._fh.seek(ti.start)
        if out.numel() and self._fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != ti.end - ti.start:
            raise AdapterError(f"{self.label}: {self.path} is truncated at tensor {key}")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._state = None



class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor, in the order of ``specs``.

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape,
    data_offsets per tensor, plus ``__metadata__``), then the raw bytes. Shapes and dtypes are
    known up front, so the header goes first and each tensor is written as soon as it is
    computed: memory holds one tensor, never the file. ``safetensors.torch.save_file`` needs
    the whole state dict in memory, hence this writer.

    Example:
        >>> w = SafetensorsStreamWriter(p, [("a", torch.float32, (2, 3))])  # doctest: +SKIP
        >>> w.write("a", torch.zeros(2, 3)); w.close()  # doctest: +SKIP
    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None, background: bool = False):
        self.path = Path(path)
        # background: a thread does the file write (which releases the GIL) while the caller
        # computes the next tensor; a written tensor must stay unchanged until the *next*
        # write() returns, since that call first waits for the previous one to finish.
        self._pool = ThreadPoolExecutor(max_workers=1) if background else None
        self._pending: Future | None = None
        self._order = [name for name, _, _ in specs]
        self._specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in specs:
            n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"tensor {name} written out of order")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"tensor {name}: expected {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        self._next += 1
        if self._pool is None:
            self._write_bytes(t)
            return
        self._wait()
        self._pending = self._pool.submit(self._write_bytes, t)

    def _write_bytes(self, t: torch.Tensor) -> None:
        if t.numel():
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write (disk full...)

    def _shutdown(self) -> None:
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def close(self) -> None:
        if self._fh is None:
            return
        self._shutdown()
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors were never written")

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):  # the original error matters more
                self._shutdown()



__all__ = ["ST_DTYPES", "TORCH_TO_ST", "SafetensorsStreamWriter", "TensorFile", "TensorInfo"]
