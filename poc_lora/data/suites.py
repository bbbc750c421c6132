"""The eight commonsense suites as data: label words, answer-format line, directory, column.

A data format shared by the training data (:mod:`poc_lora.data.synthetic`,
:mod:`poc_lora.data.reasoning`) and the evaluation (:mod:`eval_harness`, which re-exports this
module as ``eval_harness.suites``), so it lives in the core, below both.

Adding a suite means adding one :class:`Suite` entry; the loaders, scorers and reports are
generic. Column names and their order follow the paper's tables (arXiv:2502.05784 Table 1).

Example:
    >>> get_suite("piqa").labels
    ('solution1', 'solution2')
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Suite:
    name: str  # directory name under --data-dir (LLM-Adapters layout)
    column: str  # column header in the paper's tables
    labels: tuple[str, ...]  # the label words the model must produce
    option_prefix: str  # how the options are written inside the instruction ("Answer1: ...")
    test_size: int  # size of the official test set (arXiv:2502.05784), for reference and progress
    # How the instruction opens; {body} is the question (LLM-Adapters layout). The options and
    # the "Answer format" line follow it.
    lead: str = "Please choose the correct answer to the question: {body}"
    # Label words searched for in generated text. The reference scorer searches the three
    # "answerN" suites for answer1..answer5 whatever their number of options, so a model that
    # says "answer4" on a 3-option question is parsed (and wrong), not "unparsed".
    extract_labels: tuple[str, ...] = ()

    @property
    def answer_format(self) -> str:
        """The instruction's last line, e.g. ``Answer format: true/false``."""
        return "Answer format: " + "/".join(self.labels)

    @property
    def search_labels(self) -> tuple[str, ...]:
        return self.extract_labels or self.labels


_ANSWER5 = tuple(f"answer{i}" for i in range(1, 6))

SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite("social_i_qa", "SIQA", ("answer1", "answer2", "answer3"), "Answer", 1954, extract_labels=_ANSWER5),
        Suite("piqa", "PIQA", ("solution1", "solution2"), "Solution", 1838,
              lead="Please choose the correct solution to the question: {body}"),
        Suite("winogrande", "WinoGrande", ("option1", "option2"), "Option", 1267,
              lead="Please choose the correct answer to fill in the blank to complete the given sentence: {body}"),
        Suite("openbookqa", "OBQA", ("answer1", "answer2", "answer3", "answer4"), "Answer", 500,
              extract_labels=_ANSWER5),
        Suite("ARC-Challenge", "ARC-c", _ANSWER5, "Answer", 1172),
        Suite("ARC-Easy", "ARC-e", _ANSWER5, "Answer", 2376),
        Suite("boolq", "BoolQ", ("true", "false"), "", 3270,
              lead="Please answer the following question with true or false, question: {body}"),
        Suite("hellaswag", "HellaSwag", ("ending1", "ending2", "ending3", "ending4"), "Ending", 10042,
              lead="Please choose the correct ending to complete the given sentence: {body}"),
    ]
}

# The paper's column order (SIQA ... HellaSwag, then the average).
SUITE_ORDER: tuple[str, ...] = tuple(SUITES)
AVERAGE_COLUMN = "Ave."
TABLE_COLUMNS: tuple[str, ...] = tuple(SUITES[s].column for s in SUITE_ORDER) + (AVERAGE_COLUMN,)


def get_suite(name: str) -> Suite:
    """Look a suite up by its directory name; an unknown name lists the valid ones."""
    try:
        return SUITES[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(SUITE_ORDER)}") from None


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[Suite]:
    """``"all"`` or a comma-separated list (or a list) of suite names -> suites in paper order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return [SUITES[s] for s in SUITE_ORDER]
    suites = [get_suite(n) for n in names]
    if not suites:
        raise ConfigError(f"no tasks given; valid tasks: all, {', '.join(SUITE_ORDER)}")
    return sorted(suites, key=lambda s: SUITE_ORDER.index(s.name))
