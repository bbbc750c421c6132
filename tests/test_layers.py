"""The house in layers: cli > workflows > eval_harness > core, no import cycles, cheap imports.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and are checked by
import-linter's own ``lint-imports``; cycles are found on grimp's import graph (the library
import-linter builds on), so neither check is our own import parser.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import poc_lora.models
import poc_lora.testing.tiny_model as tiny_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("poc_lora", "eval_harness")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert exe, "lint-imports not found: pip install -e '.[dev]' (import-linter)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([exe, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_layer_contracts_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, bad_import, contract", [
    # a data format reaching up into the evaluation (the cycle this layering removed)
    ("poc_lora/data/synthetic.py", "from eval_harness import runner", "cli > workflows > eval_harness > core"),
    # the evaluation reaching up into a workflow
    ("eval_harness/data.py", "from poc_lora import pipeline", "cli > workflows > eval_harness > core"),
    # the suites pulling in torch
    ("poc_lora/data/suites.py", "import torch", "need neither torch"),
])
def test_a_bad_import_breaks_a_contract(tmp_path, module, bad_import, contract):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{bad_import}  # noqa\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in " ".join(broken.split()), out.stdout
    assert module[:-3].replace("/", ".") in broken


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _edges(graph, unit) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = unit(module), unit(imported)
            if a != b:
                edges.setdefault(a, set()).add(b)
    return edges


def test_no_import_cycles_between_modules(graph):
    # Function-level imports count too: grimp reads every import statement.
    assert _strongly_connected(_edges(graph, lambda m: m)) == []


def test_no_import_cycles_between_packages(graph):
    # poc_lora.data.synthetic -> poc_lora.data, eval_harness.metrics.x -> eval_harness.metrics. The two
    # top-level packages do import each other by design (workflows > eval_harness > core), which the
    # layer contract orders; below them no sub-package may depend on another in a loop.
    assert _strongly_connected(_edges(graph, lambda m: ".".join(m.split(".")[:2]))) == []


def test_the_tiny_model_is_a_test_asset_the_loader_resolves(tmp_path, monkeypatch):
    """``poc-lora/tiny-llama`` resolves through poc_lora.testing; the loader keeps its old names."""
    monkeypatch.setenv("POC_LORA_CACHE", str(tmp_path))
    built = tmp_path / f"tiny-llama-v{tiny_model.TINY_MODEL_VERSION}"
    built.mkdir()
    (built / "config.json").write_text("{}")  # a finished build: resolved without rebuilding
    assert poc_lora.models.resolve_model_path("poc-lora/tiny-llama") == str(built)
    assert poc_lora.models.TINY_MODEL_ID == tiny_model.TINY_MODEL_ID == "poc-lora/tiny-llama"
    assert poc_lora.models.build_tiny_model is tiny_model.build_tiny_model
    assert "def build_tiny_model" not in Path(poc_lora.models.__file__).read_text()
    assert "def _pretrain" not in Path(poc_lora.models.__file__).read_text()


def _loaded_after(code: str) -> set[str]:
    probe = "\nimport sys; print(' '.join(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=300)
    return set(out.stdout.split())


def test_cli_help_loads_no_torch():
    code = ("import contextlib, io\nfrom poc_lora.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])")
    assert _loaded_after(code) == set()


def test_eval_harness_import_and_data_formats_are_cheap():
    # What the eval_harness docstring promises: the package, its suites and test-set loader, and
    # the JSON generators of the synthetic data load neither torch nor transformers.
    code = ("import eval_harness, eval_harness.suites, eval_harness.data, poc_lora.data.synthetic, "
            "poc_lora.data.reasoning\nfrom eval_harness import SUITES, load_suite")
    assert _loaded_after(code) == set()
    # ... and a name of the scoring part still resolves (on first access).
    assert _loaded_after("from eval_harness import extract_answer; assert extract_answer('boolq', 'true') == 'true'") \
        >= {"torch"}


def test_adapter_merge_loads_no_transformers():
    # A plain adapter merge needs torch and safetensors only; transformers, datasets and peft
    # (hundreds of MiB of RSS, scripts/bench_merge.py's peak-RSS target) load only for a merge
    # into the base model.
    assert not _loaded_after("import poc_lora.merge\nfrom poc_lora.merge import merge_adapters") & {
        "transformers", "datasets", "peft"}
