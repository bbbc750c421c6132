"""Natural-language synthetic suites: everyday questions whose answer follows from the text.

The cue-word suites (:mod:`poc_lora.data.synthetic`) teach the tiny model an arbitrary rule that
means nothing to a pretrained language model. These suites are for real models: short questions
in plain English, in the eight LLM-Adapters formats (same lead sentence, ``Answer1: ...`` options,
``Answer format: ...`` line and label words as the real test sets, through
:func:`poc_lora.data.synthetic.format_record`), whose answer needs no world knowledge, only
counting, comparing, ordering, negation or small arithmetic on what the question says:

    boolq          true/false claims: comparisons, sums, negated comparisons, counts
    piqa           which of two plans reaches a goal (how many more to get, sorted lists)
    winogrande     fill the blank with the person a comparison points to (also negated)
    social_i_qa    one-step arithmetic (gave away, received, shared)
    openbookqa     counting items of one kind in a list
    ARC-Challenge  two-step arithmetic (packs of items, then some removed)
    ARC-Easy       ordering from a chain of comparisons (who is the tallest / the shortest)
    hellaswag      continuing a counting sequence

Answer positions are balanced and the distractors are plausible (off-by-one, the wrong
operation, the other person), so a model that ignores the question sits at chance level
(1 / number of options) and a small model cannot reach 100% by format alone.

Example:
    >>> from eval_harness.suites import SUITES
    >>> rec = make_records(SUITES["boolq"], 2, seed=0)[0]
    >>> rec["answer"] in ("true", "false")
    True
"""

from __future__ import annotations

import random
from typing import Callable

from .suites import Suite
from .synthetic import NAMES, format_record, num_options

ITEMS = ("apples", "coins", "books", "stickers", "marbles", "pencils", "cards", "shells", "cookies", "stamps")
COLORS = ("red", "blue", "green", "yellow")
# (comparative, its opposite, the superlative of each)
TRAITS = (("taller", "shorter", "tallest", "shortest"), ("older", "younger", "oldest", "youngest"),
          ("faster", "slower", "fastest", "slowest"), ("heavier", "lighter", "heaviest", "lightest"))

# A problem: (question body, correct option text, distractor option texts).
Problem = tuple[str, str, list[str]]


def _names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(NAMES, k)


def _distinct(correct: int, candidates: list[int], k: int, rng: random.Random) -> list[int]:
    """``k`` distinct non-negative values from ``candidates`` (then nearby numbers), none = correct."""
    out: list[int] = []
    for v in candidates + [correct + d for d in rng.sample(range(-6, 7), 13)]:
        if v >= 0 and v != correct and v not in out:
            out.append(v)
        if len(out) == k:
            break
    return out


def _boolq(rng: random.Random, truth: bool) -> str:
    a, b = _names(rng, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:  # comparison
        x, y = rng.sample(range(1, 16), 2)
        more = (x > y) == truth
        return f"{a} has {x} {item} and {b} has {y} {item}. does {a} have {'more' if more else 'fewer'} {item} than {b}?"
    if kind == 1:  # sum
        x, y = rng.randint(2, 12), rng.randint(2, 12)
        z = x + y if truth else x + y + rng.choice([-2, -1, 1, 2])
        return f"{a} had {x} {item} and found {y} more. does {a} now have {z} {item}?"
    if kind == 2:  # negated comparison
        x, y = rng.sample(range(1, 16), 2)
        fewer = (y < x) != truth  # "is it not true that b has fewer": true when b does not have fewer
        return (f"{a} has {x} {item} and {b} has {y} {item}. is it not true that {b} has "
                f"{'fewer' if fewer else 'more'} {item} than {a}?")
    # count of a kind in a list
    colors = [rng.choice(COLORS) for _ in range(rng.randint(3, 6))]
    color = rng.choice(colors)
    n = colors.count(color)
    k = n if truth else n + rng.choice([-1, 1])
    listed = ", ".join(f"a {c} ball" for c in colors)
    return f"{a} has {listed}. does {a} have exactly {k} {color} {'ball' if k == 1 else 'balls'}?"


def _piqa(rng: random.Random) -> Problem:
    a = _names(rng, 1)[0]
    item = rng.choice(ITEMS)
    if rng.random() < 0.5:
        have, want = sorted(rng.sample(range(2, 20), 2))
        d = want - have
        wrong = d + rng.choice([-2, -1, 1, 2]) if d > 2 else d + rng.choice([1, 2])
        return (f"{a} has {have} {item} and needs exactly {want}. how can {a} get exactly {want} {item}?",
                f"get {d} more {item}", [f"get {wrong} more {item}"])
    values = rng.sample(range(1, 30), 4)
    ordered = sorted(values)
    wrong = list(ordered)
    i = rng.randrange(3)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    return (f"{a} wants to write the numbers {', '.join(map(str, values))} from smallest to largest. what should {a} write?",
            ", ".join(map(str, ordered)), [", ".join(map(str, wrong))])


def _winogrande(rng: random.Random) -> Problem:
    a, b = _names(rng, 2)
    if rng.random() < 0.5:
        item = rng.choice(ITEMS)
        x, y = rng.sample(range(1, 16), 2)
        word = rng.choice(["more", "fewer"])
        first = (x > y) == (word == "more")
        body = f"{a} has {x} {item} and {b} has {y} {item}, so _ has {word} {item}."
    else:
        more, less, _, _ = rng.choice(TRAITS)
        neg = rng.random() < 0.5
        word = rng.choice([more, less])
        first = (word == more) != neg
        body = f"{a} is {more} than {b}, so _ is {'not ' if neg else ''}the {word} one."
    return body, (a if first else b), [b if first else a]


def _social_i_qa(rng: random.Random) -> Problem:
    a, b = _names(rng, 2)
    item = rng.choice(ITEMS)
    x, y = rng.randint(5, 15), rng.randint(1, 4)
    if rng.random() < 0.5:
        body = f"{a} had {x} {item} and gave {y} of them to {b}. how many {item} does {a} have now?"
        correct, cands = x - y, [x + y, y, x]
    else:
        body = f"{a} had {x} {item} and {b} gave {a} {y} more. how many {item} does {a} have now?"
        correct, cands = x + y, [x - y, x, y]
    return body, str(correct), [str(v) for v in _distinct(correct, cands, 2, rng)]


def _openbookqa(rng: random.Random) -> Problem:
    a = _names(rng, 1)[0]
    colors = [rng.choice(COLORS) for _ in range(rng.randint(4, 7))]
    color = rng.choice(colors)
    n = colors.count(color)
    listed = ", ".join(f"a {c} cup" for c in colors)
    body = f"on {a}'s table there are {listed}. how many {color} cups are on the table?"
    return body, str(n), [str(v) for v in _distinct(n, [n + 1, n - 1, len(colors), n + 2], 3, rng)]


def _arc_challenge(rng: random.Random) -> Problem:
    a = _names(rng, 1)[0]
    item = rng.choice(ITEMS)
    k, m = rng.randint(2, 5), rng.randint(2, 6)
    g = rng.randint(1, k * m - 1)
    body = f"{a} buys {k} bags with {m} {item} in each bag and then gives away {g} {item}. how many {item} are left?"
    correct = k * m - g
    return body, str(correct), [str(v) for v in _distinct(correct, [k * m, k * m + g, k + m - g, correct + 1], 3, rng)]


def _arc_easy(rng: random.Random) -> Problem:
    people = _names(rng, 4)  # ordered from most to least
    more, _, most, least = rng.choice(TRAITS)
    pairs = [f"{people[i]} is {more} than {people[i + 1]}." for i in range(3)]
    rng.shuffle(pairs)
    top = rng.random() < 0.5
    body = f"{' '.join(pairs)} who is the {most if top else least}?"
    correct = people[0] if top else people[-1]
    return body, correct, [p for p in people if p != correct]


def _hellaswag(rng: random.Random) -> Problem:
    a = _names(rng, 1)[0]
    start, step = rng.randint(1, 20), rng.randint(2, 5)
    seq = [start + i * step for i in range(4)]
    correct = start + 4 * step
    body = f"{a} counts {', '.join(map(str, seq))} and then says"
    cands = [correct - 1, correct + 1, seq[-1] + 1, correct + step]
    return body, str(correct), [str(v) for v in _distinct(correct, cands, 3, rng)]


_PROBLEMS: dict[str, Callable[[random.Random], Problem]] = {
    "piqa": _piqa, "winogrande": _winogrande, "social_i_qa": _social_i_qa, "openbookqa": _openbookqa,
    "ARC-Challenge": _arc_challenge, "ARC-Easy": _arc_easy, "hellaswag": _hellaswag,
}


def make_record(suite: Suite, position: int, rng: random.Random, label_position: int | None = None) -> dict[str, str]:
    """One question of ``suite`` whose correct option is at ``position`` (0-based; BoolQ: 0 = true).

    ``label_position`` (default ``position``) is the label written into the record (a different
    value makes a noisy training label).
    """
    label_position = position if label_position is None else label_position
    if suite.name == "boolq":
        return format_record(suite, _boolq(rng, position == 0), [], label_position)
    body, correct, distractors = _PROBLEMS[suite.name](rng)
    n = num_options(suite)
    options = distractors[: n - 1]
    rng.shuffle(options)
    options.insert(position, correct)
    return format_record(suite, body, options, label_position)


def make_records(suite: Suite, n: int, seed: int, label_noise: float = 0.0) -> list[dict[str, str]]:
    """``n`` questions of one suite, answer positions balanced, deterministic in ``seed``.

    ``label_noise``: probability of replacing a record's label with a random one (training data).

    Example:
        >>> len(make_records(SUITES["piqa"], 4, seed=1))
        4
    """
    rng = random.Random(f"reasoning-{seed}-{suite.name}")
    n_positions = num_options(suite)
    records = []
    for i in range(n):
        position = i % n_positions
        label_position = rng.randrange(n_positions) if label_noise and rng.random() < label_noise else position
        records.append(make_record(suite, position, rng, label_position))
    rng.shuffle(records)
    return records


__all__ = ["make_record", "make_records"]
