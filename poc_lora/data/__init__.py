"""Prompt templates, instruction data, and the synthetic commonsense suites."""
