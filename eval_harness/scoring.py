"""Scoring: the paper's generation rule and a fast log-likelihood ranking.

*generate* (paper-compatible): beam search (4 beams, at most 32 new tokens, no sampling), the
response is the generated text up to any further ``### Response:`` marker, and the prediction is
:func:`extract_answer` of it. Prompts are batched with left padding; examples are processed in
order of length (less padding) and put back in their original order, so predictions do not
depend on the batch size (tested against batch size 1 in fp32).

*choice* (lm-evaluation-harness's multiple-choice scoring): the log-likelihood of each option's
*text* after the suite's lm-eval prompt (:mod:`eval_harness.choice` builds the requests),
:func:`continuation_logprobs`, on the same shared-context machinery as *rank*.

*rank* (fast): for every example, the log-likelihood of each candidate completion
``"the correct answer is <label>"`` given the prompt; the prediction is the argmax. The prompt
is run once per example and its KV cache is gathered into one row per candidate, so only the
few completion tokens are computed per candidate. No generation.

*Many models* (rank and choice): given a :class:`~eval_harness.multimodel.MultiModel` of K
models, the same shared-context scorer runs the layers below the first adapted layer once per
batch and the layers above it on K copies, and returns one result list per model.

*Prompts longer than the model's context* (``max_position_embeddings`` of its config), in both
modes the same way: the prompt is left-truncated so that prompt + completion fit in the context,
i.e. to ``context - max_new_tokens`` tokens (generate) or ``context - len(completion tokens)``
(rank, the longest candidate of that example). The BOS token, when the tokenizer adds one, is
kept; the oldest tokens after it are dropped (the question and options sit at the end of the
prompt, the instruction preamble at its start). Both functions report the indices they
truncated through their ``truncated`` list (the runner counts them as ``truncated_prompts`` in
each suite summary and warns once per suite); without that list they log a warning themselves.

Example:
    >>> extract_answer("boolq", "the correct answer is trueness")
    'true'
    >>> extract_answer("piqa", "Solution1") is None
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import GenerationConfig

from poc_lora.config import EvalArguments
from poc_lora.data.suites import Suite, get_suite
from poc_lora.errors import ConfigError, DataError

from .multimodel import MultiModel

logger = logging.getLogger(__name__)
DEFAULTS = EvalArguments()  # the one source of the evaluation defaults (poc_lora.config)

# The completion ranked in rank mode: the reference training data's ``output`` field reads like this.
CANDIDATE_FORMAT = "the correct answer is {label}"


@functools.lru_cache(maxsize=None)
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(label) for label in labels))


def _as_suite(suite: Suite | str) -> Suite:
    return suite if isinstance(suite, Suite) else get_suite(suite)


def extract_answer(suite: Suite | str, text: str) -> str | None:
    """The first label word of ``suite`` found in ``text``, or None (unparsed, counted wrong).

    The rule of the reference scorer (LLM-Adapters ``commonsense_evaluate.py``), kept exactly:
    a plain, case-sensitive *substring* search for an alternation of the label words, leftmost
    match first. So ``"trueness"`` yields ``"true"``, ``"True"`` yields nothing, and
    ``"solution2 or solution1"`` yields ``"solution2"``. At the same position the label listed
    first wins. SIQA, ARC and OBQA search ``answer1``..``answer5`` whatever their number of
    options (:attr:`Suite.search_labels`), so ``"answer5"`` on a 3-option question is parsed
    (and wrong), not unparsed.

    Example:
        >>> extract_answer("social_i_qa", "I think answer5, not answer1")
        'answer5'
    """
    match = _label_pattern(_as_suite(suite).search_labels).search(text or "")
    return match.group(0) if match else None


def candidate_labels(suite: Suite | str, instruction: str) -> tuple[str, ...]:
    """The labels ranked for one example: those whose option line appears in the instruction.

    ARC questions carry 3 to 5 options while the suite's label set has five; ranking an option
    that does not exist would only add a way to be wrong. Suites without option lines (BoolQ),
    or instructions where fewer than two option lines are found, rank every label.
    """
    suite = _as_suite(suite)
    if not suite.option_prefix:
        return suite.labels
    present = tuple(
        label for i, label in enumerate(suite.labels, 1) if f"{suite.option_prefix}{i}:" in instruction
    )
    return present if len(present) >= 2 else suite.labels


def _length_order(lengths: Sequence[int]) -> list[int]:
    # Longest first: similar lengths share a batch (little padding) and a memory problem shows
    # up in the first batch rather than after an hour.
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _left_padded(rows: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    """``input_ids`` and ``attention_mask`` of ``rows`` left-padded to the longest (as the
    tokenizer pads with ``padding_side="left"``)."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _position_ids(attention_mask: Any) -> Any:
    # Left padding: real tokens get positions 0..n-1 exactly as without padding.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def _forward_kwargs(model: Any) -> tuple[str, str | None]:
    """The names this transformers version uses for the KV cache argument and for "logits of the
    last positions only" (v5 renamed ``past_key_values`` to ``cache``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache = "cache" if "cache" in params else "past_key_values"
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache, keep


def context_length(model: Any) -> int | None:
    """The number of positions the model was trained for (its config's ``max_position_embeddings``,
    or ``n_positions`` / ``max_sequence_length`` / ``seq_length``); None when it names none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_context(ids: list[int], context: int | None, reserve: int, bos_token_id: int | None) -> list[int]:
    """``ids`` (a prompt's tokens) left-truncated so that they and ``reserve`` completion tokens
    fit in ``context`` positions; a leading ``bos_token_id`` is kept. Unchanged when they fit or
    ``context`` is None.

    Raises ConfigError when ``reserve`` leaves no room for a prompt token after the BOS.

    Example:
        >>> fit_context([1, 5, 6, 7, 8], context=4, reserve=1, bos_token_id=1)
        [1, 7, 8]
    """
    if context is None or len(ids) + reserve <= context:
        return ids
    keep = 1 if ids and bos_token_id is not None and ids[0] == bos_token_id else 0
    room = context - reserve - keep
    if room < 1:
        raise ConfigError(f"a completion of {reserve} tokens leaves no room for the prompt in the model's context "
                          f"of {context} tokens; lower max_new_tokens")
    return ids[:keep] + ids[len(ids) - room:]


def _report_truncated(cut: list[int], total: int, context: int | None, truncated: list[int] | None) -> None:
    if truncated is not None:
        truncated.extend(cut)
    elif cut:
        logger.warning("%d of %d prompts are longer than the model's context (%s tokens) minus the completion; "
                       "they were left-truncated", len(cut), total, context)


def generation_config(tokenizer: Any, num_beams: int = DEFAULTS.num_beams, max_new_tokens: int = DEFAULTS.max_new_tokens) -> Any:
    """The reference's decoding: plain beam search (its temperature/top_p/top_k are inert
    without sampling, so they are left out); the model's own generation defaults are ignored."""
    return GenerationConfig(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = DEFAULTS.batch_size,
    num_beams: int = DEFAULTS.num_beams,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    response_split: str = "### Response:",
    progress: Callable[[int], Any] | None = None,
    truncated: list[int] | None = None,
) -> list[str]:
    """Beam-search responses for ``prompts``, in their order (the text after the prompt, cut at
    the first EOS and at any further ``response_split`` marker, stripped).

    A prompt longer than the model's context minus ``max_new_tokens`` is left-truncated (module
    docstring); its index is appended to ``truncated`` when that list is given.

    Example:
        >>> generate_responses(model, tok, ["### Response:\\n"], batch_size=1)  # doctest: +SKIP
        ['the correct answer is true']
    """
    config = generation_config(tokenizer, num_beams, max_new_tokens)
    context = context_length(model)
    encoded = tokenizer(list(prompts))["input_ids"]
    fitted = [fit_context(ids, context, max_new_tokens, tokenizer.bos_token_id) for ids in encoded]
    _report_truncated([i for i, (a, b) in enumerate(zip(encoded, fitted)) if len(a) != len(b)], len(prompts),
                      context, truncated)
    out: list[str] = [""] * len(prompts)
    device = _model_device(model)
    for batch in _batches(_length_order([len(ids) for ids in fitted]), batch_size):
        ids, mask = _left_padded([fitted[i] for i in batch], tokenizer.pad_token_id, device)
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new = seqs[:, ids.shape[1] :].tolist()
        for i, ids in zip(batch, new):
            if tokenizer.eos_token_id in ids:  # batched rows are padded after their EOS
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out[i] = text.split(response_split)[0].strip()
        if progress:
            progress(len(batch))
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class _Split:
    """One example's token ids: the context shared by all its candidates (run once), each
    candidate's tokens after it, how many leading tokens of each are context, not scored, and
    how many trailing tokens of the shared part are scored (a continuation prefix common to
    every candidate, such as rank mode's "the correct answer is": scored once, added to each)."""

    shared: list[int]
    rest: list[list[int]]
    skip: list[int]
    scored: int = 0


def _split_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], score_from_shared: bool) -> _Split:
    """Token ids of one example's ``(context, continuation)`` candidates.

    Each candidate is tokenised whole (``context + continuation``, as in training); its context
    ends where that token sequence stops agreeing with the context's own tokens (usually the
    context's last token; a token earlier when the tokenizer merges across the boundary). The
    shared part is the longest token prefix all candidates have in common and within every
    context. ``score_from_shared``: score every token after that (rank mode: the candidates'
    joint likelihoods given a common context), and extend the shared part over the continuation
    tokens all candidates have in common, which are then scored once, in the shared pass,
    instead of once per candidate; else only each candidate's continuation tokens (choice mode,
    lm-evaluation-harness's ``loglikelihood``). When the candidates share no token at all (no
    BOS, contexts that differ from the first token), every candidate is given the BOS (else EOS)
    token as context, as lm-evaluation-harness does for an empty context.
    """
    contexts = sorted({c for c, _ in pairs})
    context_ids = dict(zip(contexts, tokenizer(contexts)["input_ids"]))
    full = tokenizer([c + x for c, x in pairs])["input_ids"]
    for (c, x), f in zip(pairs, full):
        if _common_prefix(context_ids[c], f) >= len(f):
            # Nothing to score: the old fallback scored the context's last token instead.
            raise DataError(f"the continuation {x!r} after the context {c[-60:]!r} adds no token to it; "
                            "a log-likelihood needs at least one continuation token")
    ends = [min(_common_prefix(context_ids[c], f), len(f) - 1) for (c, _), f in zip(pairs, full)]
    shared = min(min(ends), *(_common_prefix(full[0], f) for f in full))
    if shared < 1:
        anchor = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if anchor is None:
            raise ValueError("the candidates share no context token and the tokenizer has neither BOS nor EOS")
        full, ends, shared = [[anchor, *f] for f in full], [e + 1 for e in ends], 1
    if not score_from_shared:
        return _Split(full[0][:shared], [f[shared:] for f in full], [e - shared for e in ends])
    # every candidate keeps at least one token of its own (the one its score differs by)
    extended = max(shared, min(min(map(len, full)) - 1, *(_common_prefix(full[0], f) for f in full)))
    return _Split(full[0][:extended], [f[extended:] for f in full], [0] * len(full), extended - shared)


# Elements of float32 log-softmax computed at once in target_logprobs (64 MB): the full
# (rows, tokens, vocabulary) float32 copy of a many-models batch would take GBs.
_LOGPROB_CHUNK = 2**24


def target_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float())`` at the ``target`` ids, a chunk of rows at a time.

    ``logits``: (..., V) in any dtype; ``target``: the matching (...) token ids. Returns (...)
    float32. Equal to ``torch.log_softmax(logits.float(), -1).gather(-1, target[..., None])``
    without its full-size float32 copies.
    """
    flat, ids = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    out = torch.empty(ids.shape, dtype=torch.float32, device=logits.device)
    step = max(1, _LOGPROB_CHUNK // logits.shape[-1])
    for start in range(0, flat.shape[0], step):
        chunk = torch.log_softmax(flat[start:start + step].float(), dim=-1)
        out[start:start + step] = chunk.gather(-1, ids[start:start + step, None]).squeeze(-1)
    return out.view(target.shape)


def _gather_cache(cache: Any, row_index: Any, multi: MultiModel | None, rows: int) -> None:
    """Keep, in order, the KV-cache rows ``row_index`` (one per candidate) of a context batch of
    ``rows`` rows. With a :class:`MultiModel`, the layers from its first adapted layer on hold
    ``num_models * rows`` rows (model k's at ``[k * rows, (k + 1) * rows)``): there, model k's
    copy of each gathered row goes to block k (the layout of the continuation pass)."""
    if multi is None:
        cache.reorder_cache(row_index)
        return
    tiled = torch.cat([row_index + k * rows for k in range(multi.num_models)])
    for i, layer in enumerate(cache.layers):
        layer.reorder_cache(row_index if i < multi.first_layer else tiled)


def _score_splits(model: Any, tokenizer: Any, split: Sequence[_Split], batch_size: int,
                  progress: Callable[[int], Any] | None, truncated: list[int] | None = None) -> list[list[list[float]]]:
    """Summed log-probabilities of each candidate's scored tokens (see :class:`_Split`), per model:
    ``[model][example][candidate]`` (one model unless ``model`` is a :class:`MultiModel`).

    ``batch_size`` examples' shared contexts run together (left-padded, positions as without
    padding); their KV cache is then gathered into one row per candidate and every candidate's
    remaining tokens run in one batch, so the context is computed once per example. A shared
    context that does not fit in the model's context with its longest candidate is
    left-truncated (module docstring); its index goes to ``truncated`` (or one warning).
    With a :class:`MultiModel` of K models, both passes run the layers below the first adapted
    layer on their rows once and the layers above on K copies (one per model); then
    ``batch_size // K`` examples (at least one) run together, which keeps the memory of the
    upper layers and logits at what one model with ``batch_size`` needs.
    """
    if hasattr(model, "score_splits"):  # another engine (eval_harness.llama_cpp) scoring the same splits
        return [model.score_splits(tokenizer, split, progress, truncated)]
    multi = model if isinstance(model, MultiModel) else None
    net = multi.model if multi else model
    n_models = multi.num_models if multi else 1
    context = context_length(net)
    fitted = [dataclasses.replace(s, shared=fit_context(s.shared, context, max(map(len, s.rest)), tokenizer.bos_token_id))
              for s in split]
    if any(s.scored >= len(s.shared) for s in fitted):
        raise ConfigError(f"the model's context (max_position_embeddings: {context} tokens) leaves no room for "
                          "the prompt before the candidates' common completion tokens")
    _report_truncated([i for i, (a, b) in enumerate(zip(split, fitted)) if len(a.shared) != len(b.shared)],
                      len(split), context, truncated)
    split = fitted
    pad = tokenizer.pad_token_id
    device = _model_device(net)
    cache_arg, keep_arg = _forward_kwargs(net)
    # Only the context's last positions are needed (its last token and the scored common
    # completion tokens): skipping the other logits saves batch x length x vocabulary floats
    # (GBs for a 128k vocabulary).
    scores: list[list[list[float]]] = [[[] for _ in split] for _ in range(n_models)]
    # batch_size bounds the rows above the trunk (examples x models), so the continuation pass's
    # logits (rows x options x tokens x vocabulary floats) take the memory one model's would
    per_pass = max(1, batch_size // n_models)
    for batch in _batches(_length_order([len(s.shared) for s in split]), per_pass):
        ids, mask = _left_padded([split[i].shared for i in batch], pad, device)
        prefix = max(split[i].scored for i in batch)  # scored tokens at the end of the shared part
        with torch.inference_mode():
            with multi.share(len(batch)) if multi else contextlib.nullcontext():
                out = net(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=True,
                          **({keep_arg: prefix + 1} if keep_arg else {}))
            logits = out.logits[:, -(prefix + 1):]  # (K * b, prefix + 1, vocabulary)
            # (K * b, vocabulary): predicts each continuation's 1st token, model k's rows in block k
            first = torch.log_softmax(logits[:, -1].float(), dim=-1).view(n_models, len(batch), -1)
            shared_score = torch.zeros(n_models, len(batch), device=device)
            if prefix:
                # window position t predicts shared token t + 1 (left padding: the rows' ends align)
                counts = torch.tensor([split[i].scored for i in batch], device=device)
                scored = (torch.arange(prefix, device=device) >= prefix - counts[:, None]).float()
                logp = target_logprobs(logits[:, :-1], ids[:, -prefix:].repeat(n_models, 1))
                shared_score = (logp.view(n_models, len(batch), prefix) * scored).sum(-1)
            rows = [(b, k) for b, i in enumerate(batch) for k in range(len(split[i].rest))]
            conts = [split[batch[b]].rest[k] for b, k in rows]
            skips = [split[batch[b]].skip[k] for b, k in rows]
            row_index = torch.tensor([b for b, _ in rows], device=device)
            scored_first = torch.tensor([float(s == 0) for s in skips], device=device)
            first_tokens = torch.tensor([c[0] for c in conts], device=device)
            total = first[:, row_index, first_tokens] * scored_first + shared_score[:, row_index]  # (K, rows)
            rest = max(len(c) for c in conts) - 1
            if rest > 0:
                # Feed tokens 1..n-1 of each continuation (right-padded) on the gathered cache.
                cache = out[cache_arg]
                _gather_cache(cache, row_index, multi, len(batch))
                feed = torch.tensor([c[:-1] + [pad] * (rest + 1 - len(c)) for c in conts], device=device)
                target = torch.tensor([c[1:] + [pad] * (rest + 1 - len(c)) for c in conts], device=device)
                # target t is token t+1 of the continuation: scored when it lies past the context
                valid = torch.tensor([[float(s <= t + 1 < len(c)) for t in range(rest)] for c, s in zip(conts, skips)],
                                     device=device)
                fed = torch.tensor([[1] * (len(c) - 1) + [0] * (rest + 1 - len(c)) for c in conts], device=device)
                row_mask = torch.cat([mask[row_index], torch.ones_like(fed)], dim=1)
                ctx_len = mask[row_index].sum(-1, keepdim=True)
                pos = ctx_len + torch.arange(rest, device=device)
                with multi.share(len(rows)) if multi else contextlib.nullcontext():
                    logits = net(
                        input_ids=feed, attention_mask=row_mask, position_ids=pos, use_cache=False, **{cache_arg: cache}
                    ).logits
                logp = target_logprobs(logits, target.repeat(n_models, 1)).view(n_models, len(rows), rest)
                total = total + (logp * valid).sum(-1)
        for per_model, values in zip(scores, total.tolist()):
            for (b, _), value in zip(rows, values):
                per_model[batch[b]].append(value)
        if progress:
            progress(len(batch))
    return scores


def _one_or_many(model: Any, scores: list[list[Any]]) -> Any:
    # A MultiModel gets one result list per model; a plain model its one list.
    return scores if isinstance(model, MultiModel) else scores[0]


def rank_scores(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    batch_size: int = DEFAULTS.batch_size,
    completion_format: str = CANDIDATE_FORMAT,
    progress: Callable[[int], Any] | None = None,
    truncated: list[int] | None = None,
) -> list[dict[str, float]]:
    """Summed log-probability of ``completion_format.format(label=...)`` for each candidate label.

    ``candidates[i]`` are the labels of ``prompts[i]``; returns ``[{label: logprob}, ...]`` in
    prompt order. ``batch_size`` prompts are run together (left-padded); their KV cache is then
    gathered into one row per (prompt, candidate) and all continuations run in one batch.
    A prompt whose tokens and longest candidate exceed the model's context is left-truncated
    (module docstring); its index is appended to ``truncated`` when that list is given.
    ``model`` may be a :class:`~eval_harness.multimodel.MultiModel` of K models: the result is
    then K such lists, in its models' order (each prompt read once for all of them).

    Example:
        >>> rank_scores(model, tok, [prompt], [("true", "false")])  # doctest: +SKIP
        [{'true': -1.3, 'false': -2.9}]
    """
    split = [_split_pairs(tokenizer, [(p, completion_format.format(label=c)) for c in cands], score_from_shared=True)
             for p, cands in zip(prompts, candidates)]
    scores = _score_splits(model, tokenizer, split, batch_size, progress, truncated)
    return _one_or_many(model, [[dict(zip(cands, values)) for cands, values in zip(candidates, per_model)]
                                for per_model in scores])


def continuation_logprobs(
    model: Any,
    tokenizer: Any,
    requests: Sequence[Sequence[tuple[str, str]]],
    *,
    batch_size: int = DEFAULTS.batch_size,
    progress: Callable[[int], Any] | None = None,
    truncated: list[int] | None = None,
) -> list[list[float]]:
    """``log p(continuation | context)`` summed over the continuation's tokens, for every
    ``(context, continuation)`` pair of every example (lm-evaluation-harness's
    ``loglikelihood`` request); ``requests[i]`` are example i's options, returned in order.

    The pairs of one example usually share their context (the question); WinoGrande's share
    the sentence up to the blank and a common continuation. Whatever token prefix they share is
    run once per example (rank mode's KV-cache gathering, :func:`rank_scores`), so an example
    costs one context pass plus one short pass over its options. ``batch_size`` examples run
    together; the scores do not depend on it. A shared context longer than the model's context
    minus the longest option is left-truncated as in :func:`rank_scores` (indices appended to
    ``truncated`` when given). With a :class:`~eval_harness.multimodel.MultiModel` of K models
    the result is K such lists, as in :func:`rank_scores`. Raises :class:`DataError` for an
    empty continuation, or one that adds no token to its context (nothing to score).

    Example:
        >>> continuation_logprobs(model, tok, [[("Question: 2+2?\nAnswer:", " 4"),
        ...                                     ("Question: 2+2?\nAnswer:", " 5")]])  # doctest: +SKIP
        [[-1.2, -3.4]]
    """
    for i, pairs in enumerate(requests):
        for j, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise DataError(f"request {i}, option {j}: the continuation after the context {context[-60:]!r} "
                                "is empty; a log-likelihood needs at least one continuation token")
    split = [_split_pairs(tokenizer, pairs, score_from_shared=False) for pairs in requests]
    return _one_or_many(model, _score_splits(model, tokenizer, split, batch_size, progress, truncated))


def rank_prediction(scores: dict[str, float]) -> str:
    """The argmax label (ties go to the label listed first)."""
    return max(scores, key=scores.__getitem__)
