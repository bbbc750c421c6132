"""Prompt templates: a small registry of data, not code branches.

``llm-adapters`` reproduces, character for character, the prompt strings of the reference
implementation the paper trained and evaluated with (LLM-Adapters' ``finetune.py`` and
``commonsense_evaluate.py``). Those strings are odd — the training prompt contains the literal
text ``# noqa: E501`` and lines indented by 16 spaces, and the evaluation prompt differs from
the training one in its trailing whitespace — but an adapter trained with them is only
evaluated fairly with the very same strings, so they are kept exactly. ``alpaca`` is the clean
Alpaca layout for new work.

Each adapter directory records the template's name and :func:`template_hash`, so evaluation
can refuse (or warn about) a mismatch.

Example:
    >>> t = get_template("alpaca")
    >>> t.train_prompt({"instruction": "Say hi.", "input": ""})[-14:]
    '### Response:\\n'
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Mapping

from ..errors import ConfigError


@dataclass(frozen=True)
class PromptTemplate:
    """Format strings with ``{instruction}`` / ``{input}`` fields; the response follows the prompt."""

    name: str
    train_no_input: str
    train_with_input: str
    eval_no_input: str
    eval_with_input: str
    # Generated text is split on this marker to find the response (as the reference does).
    response_split: str = "### Response:"

    def train_prompt(self, record: Mapping[str, str]) -> str:
        """The prompt part of a training example (the ``output`` is appended after it)."""
        fmt = self.train_with_input if record.get("input") else self.train_no_input
        return fmt.format(instruction=record["instruction"], input=record.get("input", ""))

    def eval_prompt(self, record: Mapping[str, str]) -> str:
        """The prompt given to the model at evaluation time."""
        fmt = self.eval_with_input if record.get("input") else self.eval_no_input
        return fmt.format(instruction=record["instruction"], input=record.get("input", ""))

    def response(self, generated: str) -> str:
        """The response part of a decoded generation (everything after the marker)."""
        parts = generated.split(self.response_split, 1)
        return (parts[1] if len(parts) > 1 else parts[0]).strip()


_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_IND = " " * 16  # the reference's f-strings were indented inside a function body
_REF_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_REF_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)

TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        train_no_input=_ALPACA_NO_INPUT,
        train_with_input=_ALPACA_WITH_INPUT,
        eval_no_input=_ALPACA_NO_INPUT,
        eval_with_input=_ALPACA_WITH_INPUT,
    ),
    "llm-adapters": PromptTemplate(
        name="llm-adapters",
        train_no_input=(
            f"{_REF_HEAD}  # noqa: E501\n\n{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
            f"{_IND}### Response:\n{_IND}"
        ),
        train_with_input=(
            f"{_REF_HEAD_INPUT}  # noqa: E501\n\n{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
            f"{_IND}### Input:\n{_IND}{{input}}\n{_IND}\n{_IND}### Response:\n{_IND}"
        ),
        eval_no_input=(
            f"{_REF_HEAD} \n\n{_IND}### Instruction:\n{_IND}{{instruction}}\n\n{_IND}### Response:\n{_IND}"
        ),
        eval_with_input=(
            f"{_REF_HEAD_INPUT}\n\n{_IND}### Instruction:\n{_IND}{{instruction}}\n\n"
            f"{_IND}### Input:\n{_IND}{{input}}\n\n{_IND}### Response:\n{_IND}"
        ),
    ),
    # The instruction as it is (answer_style lm-eval: the instruction already is lm-evaluation-harness's
    # prompt, e.g. "Question: ...\nAnswer:", and the output its continuation, " <option text>").
    "plain": PromptTemplate(
        name="plain",
        train_no_input="{instruction}",
        train_with_input="{instruction}\n{input}",
        eval_no_input="{instruction}",
        eval_with_input="{instruction}\n{input}",
    ),
}

# File written into every adapter directory trained by poc-lora (read back by eval_harness).
TEMPLATE_RECORD_FILE = "poc_lora_template.json"


def get_template(name: str) -> PromptTemplate:
    """Look a template up by name; an unknown name lists the valid ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown prompt_template {name!r}; valid templates: {', '.join(sorted(TEMPLATES))}"
        ) from None


def template_hash(template: PromptTemplate) -> str:
    """A short, stable fingerprint of a template's strings (sha256 of their JSON)."""
    blob = json.dumps(asdict(template), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def template_record(template: PromptTemplate) -> dict[str, str]:
    """What an adapter directory records about the template it was trained with."""
    return {"prompt_template": template.name, "prompt_template_sha256": template_hash(template)}
