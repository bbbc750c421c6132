"""Commonsense accuracy: the paper's answer-extraction rule as an ``evaluate`` metric.

A prediction is the model's generated text; the answer is the first label word of the suite
found in it (case-sensitive substring search, leftmost first), and a text without any label
word counts as wrong. The rule itself lives in :func:`eval_harness.scoring.extract_answer`;
this module only aggregates, so the harness, ``Trainer(compute_metrics=...)`` and
``evaluate.combine`` all score by the same rule.

Load it offline from its path (no hub access)::

    >>> import evaluate, eval_harness
    >>> metric = evaluate.load(eval_harness.metric_path(), "boolq")  # doctest: +SKIP
    >>> metric.compute(predictions=["the correct answer is true", "True"],
    ...                references=["true", "true"])  # doctest: +SKIP
    {'accuracy': 0.5, 'correct': 1, 'total': 2, 'unparsed': 1}
"""

import datasets
import evaluate

from eval_harness.scoring import extract_answer
from eval_harness.suites import SUITE_ORDER, get_suite
from poc_lora.citation import BIBTEX
from poc_lora.errors import ConfigError

_CITATION = BIBTEX + "\n"

_DESCRIPTION = """\
Accuracy on the eight commonsense suites (LLM-Adapters layout) with the answer-extraction rule of
Nitanda et al., ICML 2025, arXiv:2502.05784, §5.2 (the LLM-Adapters commonsense scorer): the
prediction is the first label word of the suite that occurs in the generated text (case-sensitive
substring search, leftmost match first); a text with no label word is counted as wrong.
The configuration name is the suite: one of """ + ", ".join(SUITE_ORDER) + "."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts (the response after the prompt).
    references (`list` of `str`): the gold label words (the records' ``answer`` field).
    suite (`str`, optional): the suite, when the module was loaded without a configuration name.
Returns:
    accuracy (`float`): correct / total, in [0, 1].
    correct (`int`): texts whose extracted label equals the reference.
    total (`int`): number of texts.
    unparsed (`int`): texts without any label word of the suite (counted wrong).
Examples:
    >>> metric = evaluate.load(eval_harness.metric_path(), "piqa")  # doctest: +SKIP
    >>> metric.compute(predictions=["solution2 or solution1"], references=["solution2"])  # doctest: +SKIP
    {'accuracy': 1.0, 'correct': 1, 'total': 1, 'unparsed': 0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CommonsenseAccuracy(evaluate.Metric):
    """The paper's commonsense accuracy; the configuration name selects the suite."""

    def _info(self):
        if self.config_name != "default":
            get_suite(self.config_name)  # an unknown suite fails at load time, listing the valid ones
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            reference_urls=["https://arxiv.org/abs/2502.05784"],
        )

    def _compute(self, predictions, references, suite=None):
        # "default" = loaded without a configuration name: the suite must come with compute().
        name = suite or (None if self.config_name == "default" else self.config_name)
        if name is None:
            raise ConfigError("commonsense_accuracy needs a suite: evaluate.load(path, '<suite>') or "
                              f"compute(..., suite='<suite>'); valid suites: {', '.join(SUITE_ORDER)}")
        spec = get_suite(name)
        extracted = [extract_answer(spec, text) for text in predictions]
        correct = sum(p is not None and p == ref for p, ref in zip(extracted, references))
        total = len(predictions)
        return {
            "accuracy": correct / total if total else 0.0,
            "correct": correct,
            "total": total,
            "unparsed": sum(p is None for p in extracted),
        }
