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

from typing import Sequence

from poc_lora.config import CHOICE_FORMATS
# The requests are built in the core data layer, so that training (answer_style: lm-eval) renders
# exactly the requests this mode scores.
from poc_lora.data.requests import BOOLQ_WORDS, LM_EVAL_CONTEXT, ChoiceRequest, choice_request

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
