"""PEFT LoRA adapter directories: reading, validating, lazy tensor access, streaming writing.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a
legacy ``adapter_model.bin``). :func:`load_adapter` reads the config, refuses anything whose
update is not ``s * B @ A`` (DoRA, KaSA, QALoRA, other PEFT types...), parses the tensor keys
into :class:`LoraModule` records (rank, alpha, scale resolved per module, ``rank_pattern`` /
``alpha_pattern`` / rsLoRA included) and gives lazy access to the tensors.
:class:`SafetensorsStreamWriter` writes a safetensors file tensor by tensor, so a merged
adapter or model never sits in memory as a whole.

Example:
    >>> from poc_lora.adapters import load_adapter
    >>> ad = load_adapter("runs/adapter_0")  # doctest: +SKIP
    >>> m = ad.modules["model.layers.0.self_attn.q_proj"]  # doctest: +SKIP
    >>> A, B = ad.read(m.a_key), ad.read(m.b_key)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import pickle
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import AdapterError, OutputError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# safetensors dtype tags <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

# Config fields whose presence makes the update something other than s * B @ A (or adds
# state we cannot combine), so averaging (B, A) blocks would be wrong: refuse them.
_NONLINEAR_FIELDS = {
    "use_dora": "DoRA rescales W0 + s*B@A column-wise by a learned magnitude",
    "kasa_config": "KaSA inserts a learned diagonal between A and B and edits W0",
    "use_qalora": "QALoRA pools the input before A",
    "monteclora_config": "MonteCLoRA samples its update",
    "use_bdlora": "BD-LoRA constrains A or B to be block-diagonal",
    "arrow_config": "Arrow routes between adapters per token",
    "trainable_token_indices": "trainable tokens are a separate, non-LoRA update",
    "target_parameters": "LoRA on nn.Parameter (MoE experts) uses another key layout",
}

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$"
)


@dataclass
class LoraModule:
    """One adapted module of one adapter: ``delta W = scale * B @ A`` (+ ``scale * bias``)."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" (incl. Conv1D / conv) or "embedding"
    a_key: str
    b_key: str
    bias_key: str | None
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float


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
        from safetensors import safe_open

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


@dataclass
class Adapter:
    """One PEFT LoRA adapter directory, parsed and validated, tensors not yet read."""

    path: Path
    label: str
    config: dict[str, Any]
    weight_file: Path
    tensors: TensorFile
    modules: dict[str, LoraModule]
    full_keys: list[str]  # modules_to_save weights, trained bias terms, saved embeddings
    template_record: dict[str, Any] | None = None

    def read(self, key: str) -> torch.Tensor:
        return self.tensors.read(key)

    def read_checked(self, key: str) -> torch.Tensor:
        t = self.read(key)
        check_finite(t, self.label, key)
        return t

    def close(self) -> None:
        self.tensors.close()


def check_finite(t: torch.Tensor, label: str, key: str) -> None:
    """Raise :class:`AdapterError` if ``t`` holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise AdapterError(f"{label}: tensor {key} contains NaN or Inf values")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read into one reused 1 MiB buffer (no per-chunk allocations, which
    fragmented the heap by tens of MB); hashlib releases the GIL, so a thread overlaps it."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(chunk))
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


def resolve_adapter_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Expand the user's list: a directory without ``adapter_config.json`` that holds adapter
    directories stands for those (sorted by name)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise AdapterError(f"adapter directory {p} does not exist")
        if p.is_dir() and not (p / CONFIG_NAME).exists():
            subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / CONFIG_NAME).exists())
            if not subs:
                raise AdapterError(f"{p} has no {CONFIG_NAME} and holds no adapter directories")
            out.extend(subs)
        else:
            out.append(p)
    return out


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """Value of PEFT's ``rank_pattern``/``alpha_pattern`` for ``module`` (PEFT's own matcher)."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(pattern.keys(), module)
    return pattern.get(key, default)


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def read_config(path: Path, label: str) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{label}: {cfg_path} not found (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{label}: cannot parse {cfg_path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{label}: {cfg_path} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{label}: peft_type is {cfg.get('peft_type')!r} in {cfg_path}; only LORA adapters can be merged"
        )
    for name, why in _NONLINEAR_FIELDS.items():
        if cfg.get(name):
            raise AdapterError(
                f"{label}: field {name}={cfg[name]!r} in {cfg_path}: {why}, so its update is not "
                f"s*B@A and cannot be merged by concatenating (B, A)"
            )
    for name in ("r", "lora_alpha"):
        if not isinstance(cfg.get(name), (int, float)) or cfg[name] <= 0:
            raise AdapterError(f"{label}: field {name} in {cfg_path} must be a positive number, got {cfg.get(name)!r}")
    return cfg


def _weight_file(path: Path, label: str) -> Path:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (path / name).is_file():
            return path / name
    raise AdapterError(f"{label}: neither {SAFETENSORS_NAME} nor {BIN_NAME} found in {path}")


def _module_name(prefix: str) -> str:
    return prefix[len(PEFT_PREFIX):] if prefix.startswith(PEFT_PREFIX) else prefix


def parse_modules(cfg: dict[str, Any], tensors: TensorFile, label: str) -> tuple[dict[str, LoraModule], list[str]]:
    """Group LoRA keys by module and resolve each module's rank, alpha and scale."""
    parts: dict[str, dict[str, str]] = {}
    full: list[str] = []
    for key in tensors.keys():
        m = _LORA_KEY.match(key)
        if m:
            parts.setdefault(m["module"], {})[m["part"]] = key
        elif "lora_" in key:
            raise AdapterError(f"{label}: unsupported LoRA tensor {key} (DoRA magnitude, unsaved adapter name, ...)")
        else:
            full.append(key)
    modules: dict[str, LoraModule] = {}
    use_rslora = bool(cfg.get("use_rslora", False))
    for prefix, p in sorted(parts.items()):
        kind = "embedding" if "lora_embedding_A" in p or "lora_embedding_B" in p else "linear"
        a_part, b_part = (
            ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        )
        if a_part not in p or b_part not in p:
            raise AdapterError(f"{label}: module {prefix} has only one of {a_part} / {b_part}")
        a_shape, b_shape = tensors.info[p[a_part]].shape, tensors.info[p[b_part]].shape
        if len(a_shape) < 2 or len(b_shape) < 2 or b_shape[1] != a_shape[0]:
            raise AdapterError(
                f"{label}: module {prefix}: inconsistent shapes {a_part} {list(a_shape)} and {b_part} {list(b_shape)}"
            )
        name = _module_name(prefix)
        rank = a_shape[0]
        r_cfg = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
        if int(r_cfg) != rank:
            raise AdapterError(
                f"{label}: module {name} has rank {rank} in its tensors but r={r_cfg} in adapter_config.json"
            )
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"]))
        modules[name] = LoraModule(
            name=name, kind=kind, a_key=p[a_part], b_key=p[b_part], bias_key=p.get("lora_B.bias"),
            a_shape=a_shape, b_shape=b_shape, rank=rank, alpha=alpha, scale=lora_scale(alpha, rank, use_rslora),
        )
    if not modules:
        raise AdapterError(f"{label}: {tensors.path} holds no LoRA tensors")
    return modules, sorted(full)


def load_adapter(path: str | Path, label: str | None = None) -> Adapter:
    """Read and validate one adapter directory (tensors stay on disk until read)."""
    from .data.templates import TEMPLATE_RECORD_FILE

    path = Path(path)
    label = label or f"adapter {path}"
    cfg = read_config(path, label)
    weight_file = _weight_file(path, label)
    tensors = TensorFile(weight_file, label)
    try:
        modules, full = parse_modules(cfg, tensors, label)
    except BaseException:
        tensors.close()
        raise
    record = None
    rec_path = path / TEMPLATE_RECORD_FILE
    if rec_path.is_file():
        try:
            record = json.loads(rec_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            tensors.close()
            raise AdapterError(f"{label}: cannot parse {rec_path}: {exc}") from None
    return Adapter(path, label, cfg, weight_file, tensors, modules, full, record)


def is_inside(child: Path, parent: Path) -> bool:
    """True when ``child`` is ``parent`` or lies below it (after resolving links)."""
    c, p = child.resolve(), parent.resolve()
    return c == p or p in c.parents


def check_output_not_input(output: Path, inputs: Iterable[Path]) -> None:
    for p in inputs:
        if is_inside(output, p) or is_inside(p, output):
            raise OutputError(f"output {output} is, lies inside, or contains the input {p}; choose another --output")


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
