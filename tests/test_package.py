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
COMMANDS = ["train", "ensemble", "merge", "eval", "mfnn", "pipeline", "plan", "demo"]


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


def test_public_api_names_resolve_lazily():
    # Importing the package must not import torch (fast CLI start-up); names load on access.
    code = "import sys, poc_lora; assert 'torch' not in sys.modules; print(poc_lora.PocLoraError.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PocLoraError"
