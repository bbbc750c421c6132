"""Synthetic commonsense suites: the eight LLM-Adapters formats with a learnable rule.

Nothing can be downloaded on CI or on a fresh CPU machine, yet a new user should see the whole
method (train M adapters, merge, evaluate) work. This module writes a training file shaped like
commonsense_170k and ``<suite>/test.json`` files shaped like the LLM-Adapters test sets, for all
eight suites, with the real instruction layout (options written inside the instruction, an
``Answer format: ...`` last line, ``output`` = "the correct answer is <label>", ``answer`` = label).

The rule that decides the answer: every question mentions exactly one *cue word*, and each cue
word belongs to one answer position (1st, 2nd, ...). A model must learn which of the 24 cue
words points to which position and then emit that position's label word for the suite at hand
(``true``/``false``, ``solution2``, ``ending3``, ...). Everything else (names, filler phrases,
options) is random. Training labels are flipped with a small probability (``label_noise``) so
single adapters disagree somewhat, as real ones do; test labels are always clean, so accuracy
measures how well the rule was learned (chance level is 1 / number of options).

Example:
    >>> from poc_lora.data.synthetic import write_synthetic_commonsense
    >>> root = write_synthetic_commonsense("data/synthetic", seed=0)  # doctest: +SKIP
    >>> sorted(p.name for p in root.iterdir())[:2]  # doctest: +SKIP
    ['ARC-Challenge', 'ARC-Easy']
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from .suites import SUITE_ORDER, SUITES, Suite

from ..outputs import atomic_output_dir

TRAIN_FILE = "commonsense_train.json"
# ``data_path`` value that means "write the synthetic commonsense suites" (see poc_lora.data.instructions).
SYNTHETIC_DATA = "synthetic"
# ... or the natural-language synthetic suites for real models (poc_lora.data.reasoning).
SYNTHETIC_REASONING_DATA = "synthetic-reasoning"
SYNTHETIC_KINDS = (SYNTHETIC_DATA, SYNTHETIC_REASONING_DATA)

# Cue words per answer position (index 0 -> first label). Disjoint from every other word list.
CUES: tuple[tuple[str, ...], ...] = (
    ("amber", "basil", "cedar", "delta", "ember", "fjord"),
    ("marble", "nectar", "onyx", "pepper", "quartz", "raven"),
    ("acorn", "bramble", "cobalt", "dune", "elm", "flint"),
    ("maple", "nutmeg", "opal", "pine", "quill", "reed"),
)
NAMES = ("Alex", "Blair", "Casey", "Dana", "Emery", "Finley", "Gray", "Harper", "Jordan", "Kai", "Logan", "Morgan")
NOUNS = ("table", "garden", "kitchen", "window", "bottle", "basket", "ladder", "candle", "bridge", "market",
         "pencil", "blanket", "bucket", "engine", "mirror", "pillow", "rope", "shelf", "tent", "wagon")
VERBS = ("found", "carried", "painted", "cleaned", "moved", "opened", "fixed", "washed", "folded", "lifted")
ADJECTIVES = ("small", "heavy", "bright", "quiet", "old", "warm", "round", "tall", "soft", "clean")
PLACES = ("park", "school", "station", "library", "farm", "beach", "office", "museum")
WH = ("What", "Which", "Where", "Why", "How")

# How many options each suite's questions carry (ARC's label set allows five; its questions have four).
_NUM_OPTIONS = {"ARC-Challenge": 4, "ARC-Easy": 4}


def vocabulary() -> list[str]:
    """Every word the generator can emit (for building the tiny model's tokenizer)."""
    words: list[str] = []
    for group in (*CUES, NAMES, NOUNS, VERBS, ADJECTIVES, PLACES, WH):
        words.extend(group)
    for suite in SUITES.values():
        words.extend(suite.lead.replace("{body}", "").replace(",", " ").replace(":", " ").split())
    for suite in SUITES.values():
        words.extend(suite.labels)
        words.extend(f"{suite.option_prefix}{i + 1}" for i in range(5) if suite.option_prefix)
    words.extend("the correct answer is Answer format near at and then was did do _ ? .".split())
    return sorted(set(words))


def _phrase(rng: random.Random) -> str:
    return f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def _body(suite: Suite, cue: str, rng: random.Random) -> str:
    name, verb, place = rng.choice(NAMES), rng.choice(VERBS), rng.choice(PLACES)
    clause = f"{name} {verb} {_phrase(rng)} near the {cue} at the {place}"
    if suite.name == "boolq":
        return f"did {clause}?"
    if suite.name == "winogrande":
        return f"{clause} and _ was {rng.choice(ADJECTIVES)}."
    if suite.name == "hellaswag":
        return f"{clause} and then"
    return f"{clause}. {rng.choice(WH)} did {name} do?"


def format_record(suite: Suite, body: str, options: list[str], label_position: int) -> dict[str, str]:
    """A record in ``suite``'s LLM-Adapters layout: the suite's lead with ``body``, the options
    (``Answer1: ...``; none for BoolQ), the ``Answer format`` line; ``output`` and ``answer`` name
    the label at ``label_position`` (0-based)."""
    parts = [suite.lead.format(body=body)]
    if suite.option_prefix:
        parts += [f"{suite.option_prefix}{i + 1}: {text}" for i, text in enumerate(options)]
    parts.append(suite.answer_format)
    label = suite.labels[label_position]
    return {
        "instruction": "\n\n".join(parts),
        "input": "",
        "output": f"the correct answer is {label}",
        "answer": label,
    }


def num_options(suite: Suite) -> int:
    """How many options the generated questions of ``suite`` carry."""
    return _NUM_OPTIONS.get(suite.name, len(suite.labels))


def make_record(suite: Suite, position: int, rng: random.Random, label_position: int | None = None) -> dict[str, str]:
    """One record of ``suite`` whose cue word points at answer ``position`` (0-based).

    ``label_position`` (default: ``position``) is the label written into the record; a different
    value makes a noisy training label.
    """
    label_position = position if label_position is None else label_position
    cue = rng.choice(CUES[position])
    body = _body(suite, cue, rng)
    options = [_phrase(rng) for _ in range(num_options(suite))] if suite.option_prefix else []
    return format_record(suite, body, options, label_position)


def make_records(suite: Suite, n: int, seed: int, label_noise: float = 0.0) -> list[dict[str, str]]:
    """``n`` records of one suite, answer positions balanced, deterministic in ``seed``."""
    rng = random.Random(f"{seed}-{suite.name}")
    n_positions = num_options(suite)
    records = []
    for i in range(n):
        position = i % n_positions
        label_position = position
        if label_noise and rng.random() < label_noise:
            label_position = rng.randrange(n_positions)
        records.append(make_record(suite, position, rng, label_position))
    rng.shuffle(records)
    return records


def write_synthetic_commonsense(
    output: str | Path,
    *,
    train_per_suite: int = 400,
    test_per_suite: int = 100,
    label_noise: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    generator: Callable[..., list[dict[str, str]]] | None = None,
) -> Path:
    """Write ``commonsense_train.json`` and ``<suite>/test.json`` for the eight suites.

    The training file mixes all suites (like commonsense_170k) in a seeded shuffled order.
    ``generator(suite, n, seed=..., label_noise=...)`` makes one suite's records (default
    :func:`make_records`, the cue-word rule; :func:`poc_lora.data.reasoning.make_records` writes
    natural-language questions). Returns ``output``. Same arguments, same bytes.
    """
    generator = generator or make_records
    train: list[dict[str, Any]] = []
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for k, name in enumerate(SUITE_ORDER):
            suite = SUITES[name]
            train += generator(suite, train_per_suite, seed=seed, label_noise=label_noise)
            test = generator(suite, test_per_suite, seed=seed + 10_000)
            (tmp / name).mkdir()
            (tmp / name / "test.json").write_text(json.dumps(test, indent=2) + "\n")
        random.Random(seed).shuffle(train)
        (tmp / TRAIN_FILE).write_text(json.dumps(train, indent=2) + "\n")
    return Path(output)
