"""The tiny offline Llama: a test asset that also runs the offline demo.

For CPU-only machines, tests and CI: a *tiny* Llama built from a config, with a word-level
tokenizer built here, saved in the standard format so ``AutoModelForCausalLM`` /
``AutoTokenizer`` load it like any other model. Its embedded id is :data:`TINY_MODEL_ID`;
:func:`tiny_model_path` builds it on first use (seeded, so the same files every time) under the
cache directory, briefly pretrained on held-out cue-word synthetic suites
(:mod:`poc_lora.data.synthetic`).

Design: this module sits above the data layer (it tokenises synthetic records) and below the
production loader, which imports :func:`tiny_model_path` to resolve :data:`TINY_MODEL_ID`
(``poc_lora.models.resolve_model_path``). Nothing here imports :mod:`poc_lora.models`, so the
dependency goes one way; ``pyproject.toml``'s import-linter contract keeps it so.

Example:
    >>> from poc_lora.testing.tiny_model import build_tiny_model
    >>> path = build_tiny_model("/tmp/tiny")  # random weights, a few seconds  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..cache import build_once, cache_dir, save_asset_model
from ..data.instructions import data_collator, tokenize_examples
from ..data.suites import SUITE_ORDER, SUITES
from ..data.synthetic import make_records, vocabulary
from ..data.templates import TEMPLATES, get_template
from ..errors import OutputError
from ..outputs import atomic_output_dir

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "poc-lora/tiny-llama"
# Bump when the tiny model's recipe changes so stale caches are not reused.
TINY_MODEL_VERSION = 2
# The tiny base is pretrained briefly, like any real base model: full-parameter AdamW on
# held-out synthetic data (its own seed, 30% label noise), enough to know the answer format and
# some of the rule. Adapters then fine-tune from a shared, meaningful starting point; from a
# purely random base every seed solves the task with a different circuit and their average
# (the PoC merge) loses to the single adapters (measured: 46% vs 87% average accuracy).
TINY_PRETRAIN_STEPS = 80
TINY_PRETRAIN_DATA_SEED = 1000
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_LM_HEAD_STD = 0.2
SPECIAL_TOKENS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word/punctuation run in ``texts``.

    Word-level (not BPE) keeps the tiny model's sequences short (~60 tokens per synthetic
    prompt) and makes each label word one token. Unknown words map to ``<unk>``; a BOS token is
    prepended like Llama's tokenizer does. The vocabulary is sorted, so it is deterministic.
    """
    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def _tiny_corpus() -> list[str]:
    texts = [" ".join(vocabulary()), "0 1 2 3 4 5 6 7 8 9 . , : ; ? ! ' \" ( ) / _ - #"]
    for t in TEMPLATES.values():
        texts += [t.train_no_input, t.train_with_input, t.eval_no_input, t.eval_with_input]
    texts += [s.answer_format for s in SUITES.values()]
    return texts


def _pretrain(model: Any, tokenizer: Any, steps: int, seed: int) -> None:
    """``steps`` full-parameter AdamW steps (batch 16, lr 1e-3) on held-out synthetic records."""
    records = [r for name in SUITE_ORDER
               for r in make_records(SUITES[name], 200, seed=TINY_PRETRAIN_DATA_SEED, label_noise=0.3)]
    random.Random(seed).shuffle(records)
    enc = tokenize_examples(records, tokenizer, get_template("alpaca"), cutoff_len=256, train_on_inputs=False)
    examples = [dict(zip(enc, values)) for values in zip(*enc.values())]
    collate = data_collator(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    batch_size = 16
    for step in tqdm(range(steps), desc="pretraining the tiny model (once)", unit="step"):
        start = (step * batch_size) % len(examples)
        loss = model(**collate(examples[start:start + batch_size])).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def build_tiny_model(output: str | Path, seed: int = 0, overwrite: bool = False, pretrain_steps: int = 0,
                     **config: Any) -> Path:
    """Write a tiny Llama (``TINY_CONFIG`` + ``config``) and its tokenizer.

    The weights are random (``pretrain_steps=0``, what tests use: fast) or briefly pretrained on
    held-out synthetic data (what :data:`TINY_MODEL_ID` resolves to). The directory is a normal
    ``save_pretrained`` model directory (safetensors), built atomically. The same seed gives the
    same weights on the same machine.
    """
    tokenizer = build_word_tokenizer(_tiny_corpus())
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIG, **config},
    )
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        # With the default init (std 0.02) the output layer can only produce logit margins of
        # about 1 on the RMS-normalised hidden state, so a LoRA on the frozen random base could
        # never become confident. A larger output layer gives the adapters room to learn.
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, TINY_LM_HEAD_STD)
        if pretrain_steps:
            _pretrain(model, tokenizer, pretrain_steps, seed)
        model.generation_config = GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
        )
        save_asset_model(model, tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


def tiny_model_path() -> str:
    """The directory of :data:`TINY_MODEL_ID`, built (pretrained) on first use under the cache.

    Example:
        >>> tiny_model_path()  # doctest: +SKIP
        '/home/me/.cache/poc-lora/tiny-llama-v2'
    """
    path = cache_dir() / f"tiny-llama-v{TINY_MODEL_VERSION}"

    def build() -> None:
        logger.info("building the tiny offline model in %s (once; %d pretraining steps)", path, TINY_PRETRAIN_STEPS)
        build_tiny_model(path, pretrain_steps=TINY_PRETRAIN_STEPS)

    build_once(path, lambda p: (p / "config.json").exists(), build)
    return str(path)


__all__ = [
    "SPECIAL_TOKENS", "TINY_CONFIG", "TINY_MODEL_ID", "TINY_MODEL_VERSION", "TINY_PRETRAIN_DATA_SEED",
    "TINY_PRETRAIN_STEPS", "build_tiny_model", "build_word_tokenizer", "tiny_model_path",
]
