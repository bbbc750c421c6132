"""``choice`` mode: lm-evaluation-harness's multiple-choice requests, built from LLM-Adapters records.

lm-evaluation-harness (EleutherAI) scores these suites by the log-likelihood of each option's
*text* as a continuation of a plain prompt, never by label words. Its definitions, per suite
(its task files ``arc_easy.yaml``, ``openbookqa.yaml``, ``super_glue/boolq/default.yaml``,
``piqa.yaml``, ``siqa.yaml``, ``hellaswag.yaml`` + ``utils.py``, ``winogrande`` +
``preprocess_winogrande.py``), with ``q`` the question and ``o`` an option text:

=============  ===================================  ====================================
suite          context                              continuation
=============  ===================================  ====================================
ARC-c, ARC-e   ``"Question: {q}\\nAnswer:"``         ``" {o}"``
OBQA           ``"{q}"`` (the question stem)         ``" {o}"``
BoolQ          ``"Question: {q}?\\nAnswer:"``        ``" no"`` / ``" yes"``
PIQA           ``"Question: {q}\\nAnswer:"``         ``" {o}"``
SIQA           ``"Q: {q}\\nA:"``                     ``" {o}"``
HellaSwag      ``"{q}"`` (cleaned)                   ``" {o}"`` (cleaned)
WinoGrande     the sentence up to the blank ``_``,   ``" "`` + the rest of the sentence
               with ``o`` in the blank               after the blank (the same for both)
=============  ===================================  ====================================

``acc`` is right when the option with the highest summed log-likelihood is the answer;
``acc_norm`` divides each log-likelihood by the option's length in characters first (``len`` of
the option text without the leading space, as lm-evaluation-harness does). WinoGrande's options
share their continuation, so its ``acc_norm`` divides by that common length and equals ``acc``
(lm-evaluation-harness reports only ``acc`` there, as for BoolQ and SIQA).

Mapping from the LLM-Adapters records: ``q`` is the instruction's question with the suite's lead
sentence removed, and the options are the texts of its ``Answer1: ...`` lines
(:func:`poc_lora.data.choices.parse_choices`); the record's label word (``answer3``) names the
correct option. Differences from the hub records lm-evaluation-harness reads: BoolQ records
carry no passage (the context is the question alone; a trailing ``?`` is not doubled) and map
``true``/``false`` to ``yes``/``no``; SIQA's ``q`` is "context question" joined by a space, as
lm-evaluation-harness writes it; HellaSwag's ``q`` is "activity: context" as LLM-Adapters wrote
it (lm-evaluation-harness capitalises the second context sentence; the records no longer
separate it), cleaned of WikiHow's bracket tags like lm-evaluation-harness's ``preprocess``.

``choice_format: template`` instead scores the option texts the way ``answer_style: text``
trains an adapter: context = the adapter's prompt template, continuation = "the correct answer
is <option text>" (BoolQ: ``true``/``false``); ``acc_norm`` divides by the option text's length.

Example:
    >>> rec = {"instruction": "Please choose the correct answer to the question: Which is a metal?"
    ...        "\\n\\nAnswer1: wood Answer2: iron\\n\\nAnswer format: answer1/answer2", "answer": "answer2"}
    >>> choice_request("ARC-Easy", rec).pairs[1]
    ('Question: Which is a metal?\\nAnswer:', ' iron')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from poc_lora.config import CHOICE_FORMATS
from poc_lora.data.choices import TARGET_FORMAT, parse_choices
from poc_lora.data.suites import Suite, get_suite
from poc_lora.errors import DataError

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


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal values, as numpy's


def choice_predictions(request: ChoiceRequest, logprobs: Sequence[float]) -> tuple[str, str]:
    """The label words ``acc`` and ``acc_norm`` choose: argmax of the log-likelihoods, and of the
    log-likelihoods divided by the options' lengths (ties: the option listed first).

    Example:
        >>> r = ChoiceRequest(((" ", " a"), (" ", " bbbb")), ("answer1", "answer2"), (1, 4))
        >>> choice_predictions(r, [-2.0, -4.0])
        ('answer1', 'answer2')
    """
    norm = [lp / max(n, 1) for lp, n in zip(logprobs, request.lengths)]
    return request.labels[_argmax(logprobs)], request.labels[_argmax(norm)]


__all__ = ["BOOLQ_WORDS", "CHOICE_FORMATS", "ChoiceRequest", "LM_EVAL_CONTEXT", "choice_predictions", "choice_request"]
