"""Model cards: a filled ``README.md`` for every adapter and merge directory poc-lora writes.

Built with ``huggingface_hub.ModelCard`` / ``ModelCardData`` (the hub's own format), so a card
parses with ``ModelCard.load`` and shows on the hub. Metadata follows PEFT's adapter cards
(``base_model`` = the adapter's ``base_model_name_or_path``, ``library_name: peft``,
``pipeline_tag``, ``base_model:adapter:<base>`` tag) plus ``lora`` / ``noisy-adamw`` /
``poc-merge`` tags, ``license`` and ``datasets`` when they are known. The body says what the
directory holds, the method and its citation, the settings (a table for people and a
``yaml`` block with the exact values, as mergekit's cards carry their configuration), and the
evaluation table once the pipeline has evaluated the model.

Writers (each replaces ``README.md``, e.g. PEFT's empty template, atomically):

* :func:`write_training_card`: a trained adapter (``poc_lora.train``), from its config and record;
* :func:`write_merge_card`: a merged adapter or model (``poc_lora.merge``), from its MergeReport;
* :func:`add_ensemble_section`: which ensemble member an adapter is (``poc_lora.ensemble``);
* :func:`add_evaluation_cards`: the evaluation table and ``model-index`` results (``poc_lora.pipeline``).

Example:
    >>> from huggingface_hub import ModelCard
    >>> card = ModelCard.load("runs/merged/README.md")  # doctest: +SKIP
    >>> card.data.base_model, card.data.tags  # doctest: +SKIP
    ('poc-lora/tiny-llama', ['base_model:adapter:poc-lora/tiny-llama', 'lora', 'poc-merge', ...])
"""

from ._common import CARD_NAME, MERGE_KEY, PAPER_LORA, TRAINING_KEY, read_card_block
from .merge import merge_card, merge_values, write_merge_card
from .sections import add_ensemble_section, add_evaluation_cards
from .training import training_card, training_values, write_training_card

__all__ = [
    "CARD_NAME", "MERGE_KEY", "PAPER_LORA", "TRAINING_KEY", "add_ensemble_section", "add_evaluation_cards", "merge_card",
    "merge_values", "read_card_block", "training_card", "training_values", "write_merge_card",
    "write_training_card",
]
