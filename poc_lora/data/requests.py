"""Multiple-choice requests, ``(context, continuation)`` per option, for scoring and for training.

``choice_request`` builds what ``choice`` mode scores (the formats are documented in
:mod:`eval_harness.choice`: lm-evaluation-harness's prompt per suite, or the adapter's template
with "the correct answer is <option text>"). It lives in the data layer because training uses it
too: ``answer_style: lm-eval`` (:func:`lm_eval_record`) trains on exactly the request of the
correct option, so an adapter learns the format the base model is scored in.

Example:
    >>> rec = {"instruction": "Please choose the correct answer to the question: Which is a metal?"
    ...        "\\n\\nAnswer1: wood Answer2: iron\\n\\nAnswer format: answer1/answer2", "answer": "answer2"}
    >>> lm_eval_record("ARC-Easy", rec)["instruction"], lm_eval_record("ARC-Easy", rec)["output"]
    ('Question: Which is a metal?\\nAnswer:', ' iron')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import DataError
from .choices import TARGET_FORMAT, parse_choices, record_answer
from .suites import Suite, get_suite

CHOICE_FORMATS = ("lm-eval", "template")


# lm-evaluation-harness's prompt per suite ({q}: the question); BoolQ and WinoGrande are special
# cases below (fixed option words; the option inside the context).
LM_EVAL_CONTEXT = {
    "ARC-Challenge": "Question: {q}\nAnswer:",
    "ARC-Easy": "Question: {q}\nAnswer:",
    "openbookqa": "{q}",
    "boolq": "Question: {q}?\nAnswer:",
    "piqa": "Question: {q}\nAnswer:",
    "social_i_qa": "Q: {q}\nA:",
    "hellaswag": "{q}",
}
BOOLQ_WORDS = {"false": "no", "true": "yes"}  # lm-evaluation-harness's choices ["no", "yes"]


@dataclass(frozen=True)
class ChoiceRequest:
    """One question's options as ``(context, continuation)`` pairs, the label word each option
    answers to, and ``acc_norm``'s divisor per option (characters)."""

    pairs: tuple[tuple[str, str], ...]
    labels: tuple[str, ...]
    lengths: tuple[int, ...]


def _clean_hellaswag(text: str) -> str:
    """WikiHow's artefacts removed as lm-evaluation-harness's HellaSwag ``preprocess`` does: a
    ``[title]`` tag becomes a sentence break, other bracket tags go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def choice_request(suite: Suite | str, record: Mapping[str, str], template: Any = None,
                   choice_format: str = "lm-eval") -> ChoiceRequest:
    """The ``choice``-mode request of one LLM-Adapters test record of ``suite``.

    ``choice_format``: ``lm-eval`` (the table in the module docstring) or ``template``
    (``template.eval_prompt(record)`` + "the correct answer is <option text>").

    Raises:
        DataError: the option list cannot be parsed, or (WinoGrande) the sentence has no blank.
    """
    suite = suite if isinstance(suite, Suite) else get_suite(suite)
    choices = parse_choices(record["instruction"], suite)
    q, opts = choices.question, choices.options
    if choice_format == "template":
        if template is None:
            raise ValueError("choice_format 'template' needs the adapter's prompt template")
        context = template.eval_prompt(record)
        pairs = tuple((context, TARGET_FORMAT.format(answer=o)) for o in opts)
        return ChoiceRequest(pairs, choices.labels, tuple(len(o) for o in opts))
    if choice_format != "lm-eval":
        raise ValueError(f"unknown choice_format {choice_format!r}; valid: {', '.join(CHOICE_FORMATS)}")
    if suite.name == "winogrande":
        blank = q.find("_")
        if blank < 0:
            raise DataError("the WinoGrande sentence has no blank '_' for the options")
        rest = q[blank + 1:].strip()
        pairs = tuple((q[:blank] + o, " " + rest) for o in opts)
        return ChoiceRequest(pairs, choices.labels, (len(rest),) * len(opts))
    if suite.name == "boolq":
        q = q.rstrip().rstrip("?")
        opts = tuple(BOOLQ_WORDS.get(o, o) for o in opts)
    if suite.name == "hellaswag":
        q, opts = _clean_hellaswag(q), tuple(_clean_hellaswag(o) for o in opts)
    context = LM_EVAL_CONTEXT[suite.name].format(q=q)
    return ChoiceRequest(tuple((context, " " + o) for o in opts), choices.labels, tuple(len(o) for o in opts))


def lm_eval_record(suite: Suite | str, record: Mapping[str, str]) -> dict[str, str]:
    """``record`` rendered as the lm-eval ``choice`` request of its correct option: ``instruction``
    = the context, ``input`` = "", ``output`` = the continuation (e.g. " iron"); train it with the
    ``plain`` prompt template, which passes the instruction through unchanged. Other fields are
    kept; the input record is not modified.

    Raises:
        DataError: the option list cannot be parsed, or the record names no label word.
    """
    suite = suite if isinstance(suite, Suite) else get_suite(suite)
    request = choice_request(suite, record)
    answer = record_answer(record, request.labels)
    if answer is None:
        raise DataError(f"no label word ({', '.join(request.labels)}) in 'answer' or 'output'")
    context, continuation = request.pairs[request.labels.index(answer)]
    return {**record, "instruction": context, "input": "", "output": continuation}


__all__ = ["BOOLQ_WORDS", "CHOICE_FORMATS", "ChoiceRequest", "LM_EVAL_CONTEXT", "choice_request", "lm_eval_record"]
