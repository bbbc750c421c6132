"""Data formats (core layer): the eight suites' definitions, prompt templates, instruction data, and
the synthetic commonsense suites."""
