"""Commonsense evaluation for poc-lora: the eight suites, generation and ranking modes."""

from .suites import SUITES, Suite, get_suite, parse_tasks

__all__ = ["SUITES", "Suite", "get_suite", "parse_tasks"]
