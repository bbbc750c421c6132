"""The eight commonsense suites (re-exported from :mod:`poc_lora.data.suites`, where the training
data and the evaluation share them).

Example:
    >>> get_suite("piqa").labels
    ('solution1', 'solution2')
"""

from poc_lora.data.suites import AVERAGE_COLUMN, SUITE_ORDER, SUITES, TABLE_COLUMNS, Suite, get_suite, parse_tasks

__all__ = ["AVERAGE_COLUMN", "SUITE_ORDER", "SUITES", "TABLE_COLUMNS", "Suite", "get_suite", "parse_tasks"]
