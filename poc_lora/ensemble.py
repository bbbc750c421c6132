"""M adapters trained independently (seeds seed+j), sequentially, one per process or batched, then merged.

Layout under the config's ``output_dir``::

    adapter_<j>/      a plain PEFT adapter directory per member j = 0..M-1 (see poc_lora.train)
    merged/           with --merge: the PoC merge of all M (poc_lora.merge) + merge_report.json
    batched/          with --strategy batched: Trainer checkpoints of the whole ensemble
    ensemble.json     what was trained: seeds, noise seeds, strategy, data order

Member j's training seed (LoRA init, dropout), data order and noise seed are all derived from
``seed + j`` (``data_seed`` and ``noise_seed`` too when set), so adapter j is the same whichever
strategy trained it, up to floating-point reduction order (and dropout masks, in batched mode).
``data_order="shared"`` gives every member the base config's data seed instead (one micro-batch
sequence for the ensemble; LoRA init and noise still differ).

Strategies:

* ``sequential``: one process trains j = 0, 1, ..., M-1, loading the base model once: each
  member gets a fresh LoRA (``get_peft_model``) and ``unload()`` removes it afterwards, so no
  LoRA state leaks into the next member.
* ``parallel``: under ``accelerate launch --num_processes G`` (or ``torchrun``), rank g trains
  the members j = g (mod G) on its own device, with no communication during training: each
  rank hides the distributed environment from Trainer (which then neither wraps the model in
  DDP nor averages gradients) and sees only its own GPU. Completion is signalled through the
  launcher's rendezvous store; rank 0 waits for all ranks, then merges. Works across nodes
  (accelerate's multi-node launch) when ``output_dir`` is on a shared filesystem.
* ``batched``: one process, one copy of the base, all members in one pass per micro-batch
  (:mod:`poc_lora.batched`); with ``data_order="shared"`` the frozen layers below the first
  adapted one run once for all members.

Rerunning the same command resumes: finished members trained with the same settings (their
stage marker, :mod:`poc_lora.stages`, holds the same :func:`~poc_lora.train.train_settings` and
their files are intact) are skipped, an interrupted one continues from its last checkpoint (batched:
the ensemble's), and one whose files are missing, truncated or changed is rebuilt from its last
checkpoint (trained again when it has none). A finished member whose settings
differ is an error naming the changed keys (``retrain_stale=True``, as the pipeline passes,
trains it again instead); a finished member is never changed by a resume.

Example:
    >>> from poc_lora.ensemble import train_ensemble
    >>> res = train_ensemble("configs/train/tiny_cpu.yaml", 4, merge=True,
    ...                      overrides=["--output_dir", "runs/ens"])  # doctest: +SKIP
    >>> res.merged  # doctest: +SKIP
    PosixPath('runs/ens/merged')
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.distributed import PrefixStore
from torch.distributed.rendezvous import rendezvous

from .batched import train_batched
from .batched_model import check_data_order
from .cards import add_ensemble_section
from .config import STRATEGIES, TrainConfig, load_config
from .data.instructions import resolve_data_path
from .errors import ConfigError, OutputError, PocLoraError
from .merge import merge_adapters
from .outputs import write_json
from .stages import changed_settings, is_current, read_stage, stage_hash, write_stage
from .train import (AUTO_RESUME, DONE_FILE, data_sha256, is_complete, load_base_model, load_checked_records,
                    prepare_run, run_training, tokenize_run, train_settings)

logger = logging.getLogger(__name__)

MERGED_DIR = "merged"
MANIFEST = "ensemble.json"
# Set by torchrun / accelerate launch; removed in parallel mode so Trainer sees one process.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_MAX_RESTARTS")
_SHARDED_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
_WAIT = timedelta(days=7)  # rank 0 waits this long for the other ranks' adapters


def adapter_dir(root: str | os.PathLike, j: int) -> Path:
    """Directory of ensemble member ``j``."""
    return Path(root) / f"adapter_{j}"


@dataclass
class EnsembleResult:
    """What :func:`train_ensemble` produced (on rank 0 in parallel mode; other ranks: their part)."""

    adapters: list[Path]
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    merged: Path | None = None
    merge_report: Any = None


@dataclass
class _Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    store: Any = None


def _launch_env() -> _Rank:
    env = os.environ
    return _Rank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def _isolate_rank(info: _Rank) -> _Rank:
    """Connect to the launcher's store, then make this process look like a single-process run
    on one device (CUDA_VISIBLE_DEVICES narrowed to this rank's GPU, distributed env removed)."""
    for var in _SHARDED_ENV:
        if os.environ.get(var, "").lower() in ("1", "true"):
            raise ConfigError(f"--strategy parallel trains whole adapters per process; launch it with a plain "
                              f"multi-process config (configs/accelerate/multi_gpu.yaml), not {var}")
    if info.world_size > 1:
        store, _, _ = next(rendezvous("env://", timeout=_WAIT))
        info = dataclasses.replace(info, store=PrefixStore("poc_lora_ensemble", store))
    if torch.cuda.is_initialized():
        logger.warning("CUDA was initialised before the ensemble narrowed the visible devices; rank %d may "
                       "share a GPU", info.rank)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[info.local_rank % len(devices)] if devices else str(info.local_rank)
    for var in _DIST_ENV:
        os.environ.pop(var, None)
    return info


def _signal_done(info: _Rank, ok: bool) -> None:
    if info.store is not None:
        info.store.set(f"done_{info.rank}", "ok" if ok else "failed")


def _wait_for_ranks(info: _Rank) -> None:
    """Rank 0: block until every rank has signalled; fail if one of them failed."""
    if info.store is None:
        return
    keys = [f"done_{g}" for g in range(info.world_size)]
    logger.info("rank 0 waiting for %d ranks to finish their adapters", info.world_size)
    info.store.wait(keys, _WAIT)
    failed = [g for g, k in enumerate(keys) if info.store.get(k) != b"ok"]
    if failed:
        raise PocLoraError(f"rank(s) {failed} failed to train their adapters; rerun the same command to resume")


def member_configs(cfg: TrainConfig, num_adapters: int, data_order: str = "per_member") -> list[TrainConfig]:
    """Member j's config: ``output_dir/adapter_<j>``, seeds + j, resuming automatically.

    ``data_order``: ``per_member`` (member j's data order from ``seed + j``, or ``data_seed + j``)
    or ``shared`` (every member gets the base config's data seed, ``data_seed`` or else ``seed``,
    so all read the same micro-batch sequence; LoRA init and noise still differ).
    """
    check_data_order(data_order)
    members = []
    for j in range(num_adapters):
        m = cfg.for_member(j, adapter_dir(cfg.output_dir, j))
        if data_order == "shared":
            tr = cfg.training
            m.training = dataclasses.replace(m.training, data_seed=tr.seed if tr.data_seed is None else tr.data_seed)
        if not cfg.poc.overwrite_output_dir:
            m.training.resume_from_checkpoint = AUTO_RESUME
        members.append(m)
    return members


def _plan_members(members: list[TrainConfig], mine: list[int], records: list, data_sha: str | None,
                  retrain_stale: bool = False) -> tuple[list[tuple[int, Any]], list[int]]:
    """Every check before the (expensive) model load: the members still to train, each with its
    prepared run, and the finished members skipped."""
    skipped, todo = [], []
    for j in mine:
        m = members[j]
        finished = read_stage(m.output_dir) is not None or (m.output_dir / DONE_FILE).is_file()  # maybe damaged
        if finished and not m.poc.overwrite_output_dir:
            settings = train_settings(m, data_sha)
            if is_current(m.output_dir, settings):
                skipped.append(j)
                continue
            changed = changed_settings(m.output_dir, settings)
            if changed == ["not computed yet"]:
                changed = ["no record of its training settings"]
            if not changed:  # same settings, damaged files: prepare_run rebuilds it from its last checkpoint
                todo.append((j, prepare_run(m, records=records)))
                continue
            if not retrain_stale:
                raise OutputError(
                    f"{m.output_dir} holds adapter {j} trained with other settings ({', '.join(changed[:8])}); "
                    "pass --overwrite_output_dir true to train the ensemble again, or use another output_dir")
            logger.info("adapter %d in %s is stale (%s changed); training it again", j, m.output_dir,
                        ", ".join(changed[:8]))
            m = members[j] = dataclasses.replace(
                m, poc=dataclasses.replace(m.poc, overwrite_output_dir=True),
                training=dataclasses.replace(m.training, resume_from_checkpoint=None))
        todo.append((j, prepare_run(m, records=records)))
    if skipped:
        logger.info("adapters %s are already trained with these settings; skipping them", skipped)
    return todo, skipped


def _train_members(members: list[TrainConfig], mine: list[int], records: list, data_sha: str | None,
                   retrain_stale: bool = False) -> tuple[list[int], list[int]]:
    """Train this process's members one after another on one base model; returns (trained, skipped)."""
    todo, skipped = _plan_members(members, mine, records, data_sha, retrain_stale)
    trained, base = [], None
    for j, run in todo:
        logger.info("training adapter %d of %d (seed %d) into %s", j + 1, len(members), run.cfg.training.seed,
                    run.cfg.output_dir)
        tokenize_run(run)  # the data are checked before the model loads
        if base is None:
            base = load_base_model(run.cfg)
        _, peft_model = run_training(run, base)
        base = peft_model.unload()  # the base model with every LoRA layer removed
        trained.append(j)
    return trained, skipped


def _write_manifest(cfg: TrainConfig, members: list[TrainConfig], strategy: str, world: int, merged: Path | None,
                    data_order: str) -> None:
    manifest = {
        "num_adapters": len(members), "strategy": strategy, "data_order": data_order, "world_size": world,
        "temperature": cfg.poc.temperature, "base_model": cfg.model.model_name_or_path,
        "adapters": [{"index": j, "path": str(m.output_dir), "seed": m.training.seed, "noise_seed": m.noise_seed,
                      "data_seed": m.training.data_seed} for j, m in enumerate(members)],
        "merged": None if merged is None else str(merged),
    }
    path = cfg.output_dir / MANIFEST
    try:
        if json.loads(path.read_text()) == json.loads(json.dumps(manifest, default=str)):
            return  # unchanged: a rerun that trained nothing rewrites nothing
    except (OSError, ValueError):
        pass
    write_json(path, manifest)


def _merge(cfg: TrainConfig, paths: list[Path]) -> tuple[Path, Any]:
    out = cfg.output_dir / MERGED_DIR
    settings = {"method": "poc", "adapters": [str(p) for p in paths], "adapter_stages": [stage_hash(p) for p in paths]}
    if is_current(out, settings) and not cfg.poc.overwrite_output_dir:
        logger.info("%s is up to date; not merging again", out)
        return out, None
    report = merge_adapters(paths, out, method="poc", overwrite=True)
    write_stage(out, "merge", settings)
    logger.info("%s", report.summary())
    return out, report


def train_ensemble(
    config: TrainConfig | str | os.PathLike | dict[str, Any],
    num_adapters: int,
    *,
    strategy: str | None = None,
    merge: bool = False,
    overrides: Sequence[str] = (),
    retrain_stale: bool = False,
    data_order: str = "per_member",
) -> EnsembleResult:
    """Train ``num_adapters`` adapters (seeds seed+j) and optionally PoC-merge them.

    ``strategy``: ``"sequential"``, ``"parallel"`` or ``"batched"`` (default: parallel when
    launched with more than one process, else sequential). ``data_order``: ``"per_member"``
    (member j's data order from seed+j) or ``"shared"`` (one order for all members). See the
    module docstring for layout and resumption. ``retrain_stale``: train again the finished
    members whose settings changed (default: refuse).

    Example:
        >>> train_ensemble("configs/train/tiny_cpu.yaml", 2, merge=True, overrides=["--output_dir", "runs/e"])  # doctest: +SKIP
    """
    if num_adapters < 1:
        raise ConfigError(f"--num-adapters must be >= 1, got {num_adapters}")
    info = _launch_env()
    strategy = strategy or ("parallel" if info.world_size > 1 else "sequential")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    check_data_order(data_order)
    if strategy in ("sequential", "batched") and info.world_size > 1:
        raise ConfigError(f"--strategy {strategy} runs in one process, but {info.world_size} were launched; "
                          "use --strategy parallel (or launch a single process)")
    if strategy == "parallel":
        info = _isolate_rank(info)  # before anything builds TrainingArguments / touches CUDA
    ok = False
    try:
        cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
        members = member_configs(cfg, num_adapters, data_order)
        records = load_checked_records(cfg)  # one read + validation for all members
        data_sha = data_sha256(resolve_data_path(cfg.data))
        mine = [j for j in range(num_adapters) if j % info.world_size == info.rank]
        if strategy == "batched":
            todo, skipped = _plan_members(members, mine, records, data_sha, retrain_stale)
            train_batched([run for _, run in todo], cfg.output_dir, data_order, retrain_stale)
            trained = [j for j, _ in todo]
        else:
            trained, skipped = _train_members(members, mine, records, data_sha, retrain_stale)
        ok = True
    finally:
        if info.rank != 0 or not ok:
            _signal_done(info, ok)
    paths = [m.output_dir for m in members]
    result = EnsembleResult(adapters=paths, trained=trained, skipped=skipped)
    if info.rank != 0:
        return result
    _signal_done(info, True)
    _wait_for_ranks(info)
    missing = [j for j, p in enumerate(paths) if not is_complete(p)]
    if missing:
        raise PocLoraError(f"adapters {missing} are not finished; rerun the same command to resume them")
    if merge:
        result.merged, result.merge_report = _merge(cfg, paths)
    _write_manifest(cfg, members, strategy, info.world_size, result.merged, data_order)
    add_ensemble_section(paths, [m.training.seed for m in members], result.merged)
    return result


def main_ensemble(
    config_path: str, num_adapters: int, strategy: str | None, merge: bool, overrides: Sequence[str],
    data_order: str = "per_member",
) -> int:
    """``poc-lora ensemble --config CONFIG.yaml --num-adapters M [--strategy ...] [--data_order ...] [--merge]``."""
    res = train_ensemble(config_path, num_adapters, strategy=strategy, merge=merge, overrides=overrides,
                         data_order=data_order)
    if res.merged is not None:
        logger.info("merged adapter: %s", res.merged)
    return 0


__all__ = ["EnsembleResult", "adapter_dir", "main_ensemble", "member_configs", "train_ensemble"]
