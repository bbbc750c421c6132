"""The question and the options inside an LLM-Adapters instruction, and text-style targets.

An LLM-Adapters record writes its options *inside* the instruction: the suite's lead sentence
with the question, then ``Answer1: ... Answer2: ...`` (on one line, as the real files do, or one
per paragraph, as :mod:`poc_lora.data.synthetic` writes them), then ``Answer format:
answer1/answer2/...``. The label words (``answer2``, ``solution1``, ``true``) only point at an
option. Two things need the option *texts*: ``answer_style: text`` training targets ("the
correct answer is <option text>": a small model binds texts better than ``answer1..4`` symbols)
and ``choice`` scoring in :mod:`eval_harness` (the log-likelihood of each option's text, as
lm-evaluation-harness scores these suites). Both parse the instruction with
:func:`parse_choices`, in the core so that training data and evaluation share one rule.

BoolQ has no option lines: its options are its label words ``true`` and ``false``, and its
text-style target stays "the correct answer is true|false".

Example:
    >>> c = parse_choices("Please choose the correct answer to the question: Which is a metal?"
    ...                   "\\n\\nAnswer1: wood Answer2: iron\\n\\nAnswer format: answer1/answer2")
    >>> c.question, c.options, c.labels
    ('Which is a metal?', ('wood', 'iron'), ('answer1', 'answer2'))
    >>> text_target(c, "answer2")
    'the correct answer is iron'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from ..errors import DataError
from .suites import SUITES, Suite

ANSWER_FORMAT_MARK = "Answer format:"
# The training target of LLM-Adapters (``output``), with the option text (answer_style: text) or
# the label word (answer_style: label, the files as they are) in place of {answer}.
TARGET_FORMAT = "the correct answer is {answer}"
ANSWER_STYLES = ("label", "text", "lm-eval")  # lm-eval: poc_lora.data.requests.lm_eval_record
_LABEL_WORD = re.compile(r"^([A-Za-z]+?)(\d+)$")


@dataclass(frozen=True)
class Choices:
    """One question: its text (lead sentence removed), the label word of each option and the
    option texts, in the order the instruction lists them (``labels[i]`` names ``options[i]``)."""

    question: str
    labels: tuple[str, ...]
    options: tuple[str, ...]

    def option(self, label: str) -> str:
        """The text of the option that ``label`` names; DataError if there is none."""
        if label not in self.labels:
            raise DataError(f"label {label!r} names none of the options ({', '.join(self.labels)})")
        return self.options[self.labels.index(label)]


def _answer_format(instruction: str) -> tuple[str, tuple[str, ...]]:
    """The instruction without its ``Answer format: a/b/...`` line, and the label words listed there."""
    at = instruction.rfind(ANSWER_FORMAT_MARK)
    if at < 0:
        raise DataError(f"no '{ANSWER_FORMAT_MARK} ...' line, so the label words are unknown")
    words = tuple(w.strip() for w in instruction[at + len(ANSWER_FORMAT_MARK):].strip().split("/") if w.strip())
    if not words:
        raise DataError(f"the '{ANSWER_FORMAT_MARK}' line lists no label words")
    return instruction[:at].rstrip(), words


def _strip_lead(text: str, suite: Suite | None) -> str:
    """``text`` without its suite's lead sentence (any known suite's when ``suite`` is None)."""
    leads = [suite.lead] if suite else [s.lead for s in SUITES.values()]
    for lead in sorted(leads, key=len, reverse=True):
        head = lead.split("{body}")[0]
        if text.startswith(head):
            return text[len(head):]
    return text


def parse_choices(instruction: str, suite: Suite | None = None) -> Choices:
    """Parse the question and its options out of an LLM-Adapters ``instruction``.

    ``suite`` gives the option prefix (``Answer``, ``Solution``, ``Option``, ``Ending``; none for
    BoolQ) and the lead sentence; without it both are inferred from the ``Answer format`` line
    (``solution1/solution2`` -> ``Solution1: ...`` lines) and the eight suites' leads, which is
    how records of a single mixed file (``commonsense_170k.json``) are read. Options must be
    numbered 1, 2, ... (at least two, none empty); their text runs to the next option's prefix.

    Raises:
        DataError: the reason (no ``Answer format`` line, no option lines, an empty option);
            callers add the file and record index.
    """
    body, words = _answer_format(instruction)
    match = _LABEL_WORD.match(words[0])
    prefix = suite.option_prefix if suite is not None else (match.group(1).capitalize() if match else "")
    if not prefix:  # BoolQ: the label words are the options
        return Choices(_strip_lead(body, suite).strip(), words, words)
    first = re.search(rf"(?:^|\s){re.escape(prefix)}1:(?:\s|$)", body)
    if first is None:
        raise DataError(f"cannot parse the option list: no '{prefix}1:' option line")
    starts = [(first.start(), first.end())]
    while True:  # option k+1 starts at the next "<prefix>k+1:"; what lies between is option k's text
        nxt = re.compile(rf"\s{re.escape(prefix)}{len(starts) + 1}:(?:\s|$)").search(body, starts[-1][1])
        if nxt is None:
            break
        starts.append((nxt.start(), nxt.end()))
    ends = [s for s, _ in starts[1:]] + [len(body)]
    options = tuple(body[e:end].strip() for (_, e), end in zip(starts, ends))
    if len(options) < 2:
        raise DataError(f"cannot parse the option list: only one option ('{prefix}1:') found")
    empty = [i + 1 for i, o in enumerate(options) if not o]
    if empty:
        raise DataError(f"cannot parse the option list: option {prefix}{empty[0]} is empty")
    labels = tuple(f"{prefix.lower()}{i}" for i in range(1, len(options) + 1))
    return Choices(_strip_lead(body[: first.start()], suite).strip(), labels, options)


def record_answer(record: Mapping[str, str], labels: tuple[str, ...]) -> str | None:
    """The label word a training record answers: its ``answer`` field, else the last of
    ``labels`` named in its ``output`` (None if neither names one)."""
    if record.get("answer"):
        return record["answer"]
    output = record.get("output") or ""
    found = [(output.rfind(label), label) for label in labels if label in output]
    return max(found)[1] if found else None


def text_target(choices: Choices, label: str) -> str:
    """The ``answer_style: text`` target for the option ``label`` names: "the correct answer is
    <option text>" ("the correct answer is true|false" for BoolQ, whose options are its labels)."""
    return TARGET_FORMAT.format(answer=choices.option(label))


__all__ = ["ANSWER_STYLES", "Choices", "TARGET_FORMAT", "parse_choices", "record_answer", "text_target"]
