"""Commonsense evaluation for poc-lora: the eight suites, generation and ranking modes.

Importing is cheap: torch and transformers load only when a model is scored.

Example:
    >>> from eval_harness import extract_answer
    >>> extract_answer("winogrande", "option2 fits")
    'option2'
"""

from .data import from_hub_record, load_suite, write_hub_split
from .metrics import load_metric, metric_path
from .results import EvalResult, ModelResult, SuiteResult
from .runner import evaluate
from .scoring import extract_answer, generate_responses, rank_scores
from .suites import SUITES, Suite, get_suite, parse_tasks

__all__ = [
    "SUITES", "Suite", "get_suite", "parse_tasks", "extract_answer", "rank_scores", "generate_responses",
    "load_suite", "from_hub_record", "write_hub_split", "evaluate", "metric_path", "load_metric",
    "EvalResult", "ModelResult", "SuiteResult",
]
