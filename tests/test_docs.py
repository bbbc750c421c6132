"""The docs: README size, links that resolve, and generated pages that match the code."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poc_lora.citation import BIBTEX
from poc_lora.cli import main
from poc_lora.config import EvalArguments
from poc_lora.keyparser import GRAMMAR
from poc_lora.merge.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 15_000  # bytes: the README is the pitch; reference material lives in docs/


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The Markdown outside fenced code blocks and HTML comments (where links and headings count)."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(path.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", _prose(path.read_text(encoding="utf-8")))
    targets = re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:, ...


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move reference material to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for link in _relative_links(page):
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        if not file.exists():
            broken.append(f"{link}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{link}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_anchor_rule_matches_github_on_known_headings(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Noisy AdamW (`poc_lora.NoisyAdamW`)\n## bf16 / fp16 parameters\n## Limitations\n"
                    "## Limitations\n```\n# not a heading\n```\n")
    assert _anchors(page) == {"noisy-adamw-poc_loranoisyadamw", "bf16--fp16-parameters",
                              "limitations", "limitations-1"}


def test_readme_links_every_docs_page():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _relative_links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_readme_bibtex_is_the_package_citation():
    assert f"```bibtex\n{BIBTEX}\n```" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_generated_docs_are_current():
    gen = _gen_docs()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == gen.cli_markdown(), \
        "docs/cli.md is stale: run python scripts/gen_docs.py"
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == gen.config_markdown(), \
        "docs/config.md is stale: run python scripts/gen_docs.py"
    stale = [str(p.relative_to(ROOT)) for p in gen.stale_files()]
    assert not stale, f"stale generated docs {stale}: run python scripts/gen_docs.py"


def test_gen_docs_check_exits_1_on_a_stale_page(tmp_path):
    gen = _gen_docs()
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    assert gen.stale_files(tmp_path) == {}
    cli_md = tmp_path / "docs" / "cli.md"
    cli_md.write_text(cli_md.read_text(encoding="utf-8").replace("--overwrite", "--overwrite-all"), encoding="utf-8")
    assert list(gen.stale_files(tmp_path)) == [cli_md]
    cli_md.write_text(gen.cli_markdown(), encoding="utf-8")
    # the config-key page and the merge-method block inside a hand-written page are checked too
    config_md, merging_md = tmp_path / "docs" / "config.md", tmp_path / "docs" / "merging.md"
    config_md.write_text(config_md.read_text(encoding="utf-8").replace("| `lora_r` |", "| `lora_rank` |"),
                         encoding="utf-8")
    merging_md.write_text(merging_md.read_text(encoding="utf-8").replace("| `svd` |", "| `svd2` |"), encoding="utf-8")
    assert sorted(gen.stale_files(tmp_path)) == sorted([config_md, merging_md])
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_generated_block_replaces_only_the_text_between_its_markers():
    gen = _gen_docs()
    text = "before\n<!-- generated: t (a note) -->\nold\n<!-- end generated: t -->\nafter\n"
    assert gen._replace_block(text, "t", "new\n", "p.md") == \
        "before\n<!-- generated: t (a note) -->\nnew\n<!-- end generated: t -->\nafter\n"
    with pytest.raises(SystemExit, match="p.md has no"):
        gen._replace_block("no markers", "t", "new", "p.md")
    # the merge-method table is the registry's: one row per registered method
    merging = (ROOT / "docs" / "merging.md").read_text(encoding="utf-8")
    block = merging.split("<!-- generated: merge-methods", 1)[1].split("<!-- end generated: merge-methods -->", 1)[0]
    assert [re.match(r"\| `(\w+)`", row).group(1) for row in block.splitlines() if row.startswith("| `")] \
        == list(method_names())


@pytest.mark.parametrize("command", [["train"], ["ensemble"], ["merge"], ["eval"], ["export"], ["pipeline"], ["plan"],
                                     ["demo"], ["mfnn", "figure1"], ["mfnn", "figure2"], ["mfnn", "table2"]])
def test_cli_page_lists_every_option_of_the_real_help(command, capsys):
    # argparse's own --help output, not the generator's walk, is the reference here (without the
    # grammar paragraph every command ends with: docs/cli.md gives it once, at the top).
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out.split(GRAMMAR.split(" (")[0])[0]
    options = set(re.findall(r"(?<![\w.-])(--?[A-Za-z][\w-]*(?:\.[A-Za-z][\w-]*)*)", out)) - {"-h", "--help"}
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = page.split(f"`poc-lora {' '.join(command)}`\n", 1)[1].split("\n#", 1)[0]
    for prog in re.findall(r"the same \d+ keys as \[`([^`]+)`\]", section):  # a key section shared with an earlier command
        section += page.split(f"`{prog}`\n", 1)[1].split("\n#", 1)[0]
    missing = sorted(o for o in options if f"{o} " not in section and f"{o}`" not in section)
    assert options and not missing, f"poc-lora {' '.join(command)}: options missing from docs/cli.md: {missing}"


def test_cli_page_shows_each_eval_key_with_its_one_default():
    # the defaults of EvalArguments (the one source) against the rows of docs/cli.md's eval section
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = page.split("`poc-lora eval`\n", 1)[1].split("\n#", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `--(\w+)`[^|]*\| ([^|]*) \|", section, re.M)}
    for f in dataclasses.fields(EvalArguments):
        assert f.name in rows, f"--{f.name} missing from the eval section of docs/cli.md"
        shown = "" if f.default is None else f"`{f.default}`"
        assert rows[f.name] == shown, f"--{f.name}: docs/cli.md shows {rows[f.name]!r}, the default is {f.default!r}"
    assert "`--eval.data_dir`" in section and "GRAMMAR" not in section
    assert " ".join(GRAMMAR.split()) in " ".join(page.split("\n## ", 1)[0].split())
