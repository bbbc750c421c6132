"""The one override grammar of every command: config sections as ``--key value`` options.

:class:`KeyParser` turns dataclass sections (:mod:`poc_lora.config`'s, or transformers'
``TrainingArguments``) into argparse options: ``--key value`` or ``--section.key value`` on the
command line, ``key: value``, ``section.key: value`` or ``section: {key: value}`` in YAML
(:data:`GRAMMAR`). The dotted form is required only where two sections of one command share a
key name. Each field is parsed by the action ``transformers.HfArgumentParser`` builds for it
(types, booleans, lists, help), so YAML values are converted by the key's type. Old dashed
spellings are rewritten with a deprecation warning (:func:`normalize_argv`). Errors are
:class:`~poc_lora.errors.ConfigError` naming the key and the closest valid ones.
:func:`read_yaml` reads a config file, naming it in every error.

This module knows no section: which sections a command has is :mod:`poc_lora.config`'s (and
the CLI's) business.

Example:
    >>> import argparse
    >>> from poc_lora.config import EvalArguments
    >>> kp = KeyParser(RaisingArgumentParser(add_help=False), [("eval", EvalArguments, None)])  # doctest: +SKIP
    >>> kp.parse(["--batch_size", "4"])[1]["eval"]  # doctest: +SKIP
    {'batch_size': 4}
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import ConfigError

GRAMMAR = (
    "Keys: --key value (or --key=value), YAML 'key: value'. Every key also has the dotted form "
    "--section.key (YAML: 'section: {key: value}'), required where two sections of a command share a "
    "key name. Booleans: --flag, --flag true|false, or --no_flag where listed. Lists: space- or "
    "comma-separated. Spelling: underscores (old dashed spellings still work, with a warning)."
)


class RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ConfigErrors (library use: argparse would print and exit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _section_actions(cls: type) -> list[argparse.Action]:
    """The argparse actions transformers' HfArgumentParser builds for ``cls`` (types, bools,
    lists, help): the one source of how a dataclass field is parsed."""
    from transformers.hf_argparser import HfArgumentParser

    return [a for a in HfArgumentParser([cls], add_help=False)._actions]


def _dashed(option: str) -> bool:
    return "-" in option[2:] and option.startswith("--")


class KeyParser:
    """The override grammar of every command: config sections as ``--key value`` options.

    Adds, to ``parser``, one argument group per section, built from the section's dataclass by
    transformers' ``HfArgumentParser`` (so TrainingArguments' fields keep their own types and
    help). Each key is ``--key`` (when no other section of this command has it) and
    ``--section.key``; dashed variants are not registered (see :func:`normalize_argv`).
    ``only`` restricts a section to some keys (the pipeline evaluates with a subset).

    Example:
        >>> import argparse
        >>> from poc_lora.config import EvalArguments
        >>> kp = KeyParser(argparse.ArgumentParser(), [("eval", EvalArguments, None)])  # doctest: +SKIP
        >>> kp.parse(["--eval.batch_size", "4"])[1]["eval"]  # doctest: +SKIP
        {'batch_size': 4}
    """

    def __init__(self, parser: argparse.ArgumentParser,
                 sections: Sequence[tuple[str, type, Any]], legacy: Mapping[str, str] | None = None) -> None:
        self.parser = parser
        self.legacy = dict(legacy or {})  # old key -> its key now (accepted with a warning)
        self.sections = [(name, cls, None if only is None else set(only)) for name, cls, only in sections]
        self.dests: dict[str, tuple[str, str]] = {}  # argparse dest -> (section, key)
        self.names: dict[str, list[str]] = {}  # key -> the sections that have it
        actions = {name: [a for a in _section_actions(cls) if only is None or a.dest in only]
                   for name, cls, only in self.sections}
        for name, acts in actions.items():
            for key in dict.fromkeys(a.dest for a in acts):
                self.names.setdefault(key, []).append(name)
        own = set(parser._option_string_actions)
        for name, cls, _ in self.sections:
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            group = parser.add_argument_group(f"{name} keys", doc)
            for action in actions[name]:
                key = action.dest
                bare = len(self.names[key]) == 1 and f"--{key}" not in own
                dest = key if bare else f"{name}.{key}"
                options = []
                for opt in action.option_strings:
                    if _dashed(opt):
                        continue
                    stem = opt[2:]  # key, or no_key for a boolean's complement
                    options += ([opt] if bare else []) + [f"--{name}.{stem}"]
                action.option_strings, action.dest = options, dest
                if action.metavar is None and action.nargs != 0:
                    action.metavar = key.upper()
                if action.nargs == "+" and action.type is not None:
                    action.type = _CommaList(action.type)
                group._add_action(action)
                self.dests[dest] = (name, key)

    def dest(self, key: str, where: str) -> str:
        """The argparse dest of config key ``key`` (``key`` or ``section.key``); a ConfigError
        names the valid spellings for an unknown or ambiguous key."""
        if key in self.dests:
            return key
        if "." in key:
            section, name = key.split(".", 1)
            if f"{section}.{name}" in self.dests:
                return f"{section}.{name}"
            if name in self.dests and self.dests[name][0] == section:
                return name
        if key in self.names:
            raise ConfigError(f"config key {key!r} in {where} is ambiguous here: write "
                              + " or ".join(f"{s}.{key}" for s in self.names[key]))
        raise _unknown_key_error(key, where, self.keys())

    def keys(self) -> list[str]:
        """Every spelling of every key (``key`` where it is unique, and ``section.key``)."""
        out = [dest for dest in self.dests if "." not in dest]
        return out + [f"{s}.{k}" for s, k in self.dests.values()]

    def flatten(self, values: Mapping[str, Any], where: str) -> dict[str, Any]:
        """A YAML mapping (flat ``key: value``, dotted ``section.key: value`` or nested
        ``section: {key: value}``) as ``{dest: value}``."""
        out: dict[str, Any] = {}
        for key, value in values.items():
            key = str(key)
            if key in {n for n, _, _ in self.sections} and isinstance(value, Mapping) and key not in self.names:
                for sub, v in value.items():
                    out[self.dest(f"{key}.{sub}", where)] = v
            else:
                out[self.dest(key, where)] = value
        return out

    def parse(self, argv: Sequence[str], defaults: Mapping[str, Any] | None = None
              ) -> tuple[argparse.Namespace, dict[str, dict[str, Any]]]:
        """Parse ``argv`` over ``defaults`` (``{dest: value}``; strings are converted by the
        keys' types). Returns the namespace (the command's own options) and, per section, the
        keys given in ``defaults`` or ``argv`` (the others keep their dataclass defaults)."""
        # Keys start as _UNSET (or their value in ``defaults``) so that the keys given can be told
        # from the dataclass defaults, while --help still shows those defaults.
        start = argparse.Namespace(**{dest: _UNSET for dest in self.dests})
        if defaults:
            self.parser.set_defaults(**defaults)  # a str default is converted by the key's type
            for dest, value in defaults.items():
                setattr(start, dest, value)
        ns, rest = self.parser.parse_known_args(normalize_argv(argv, self.parser, self.legacy), start)
        if rest:
            unknown = next((t for t in rest if t.startswith("-")), rest[0])
            key = unknown.lstrip("-").split("=", 1)[0]
            if unknown.startswith("-") and key in self.names:  # e.g. pipeline --seed: merge.seed or training.seed
                raise ConfigError(f"config key {key!r} ({unknown}) is ambiguous here: write "
                                  + " or ".join(f"--{s}.{key}" for s in self.names[key]))
            close = difflib.get_close_matches(key, self.keys(), n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            # A config error (exit 1, "error: ..."), as a bad key in the YAML file is; argparse's
            # own usage errors (a missing required option) still exit 2.
            raise ConfigError(f"unknown config key {key!r} ({unknown}){hint}; give --key value pairs "
                              f"(list the keys: {self.parser.prog} --help)" if unknown.startswith("-")
                              else f"unrecognized arguments: {' '.join(rest)}")
        values: dict[str, dict[str, Any]] = {name: {} for name, _, _ in self.sections}
        for dest, (section, key) in self.dests.items():
            value = getattr(ns, dest)
            delattr(ns, dest)
            if value is not _UNSET:
                values[section][key] = _flatten_lists(value)
        return ns, values


_UNSET = object()


def _flatten_lists(value: Any) -> Any:
    """A list key's value with its comma-separated items split (``--weights 0.5,0.5``)."""
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            out += _flatten_lists(item) if isinstance(item, list) else [item]
        return out
    return value


class _CommaList:
    """The type of a list key's items: splits ``a,b`` (so lists are space- or comma-separated)."""

    def __init__(self, item_type: Any) -> None:
        self.item_type = item_type
        self.__name__ = getattr(item_type, "__name__", "value")

    def __call__(self, text: str) -> list[Any]:
        return [self.item_type(t.strip()) for t in str(text).split(",") if t.strip()]


def normalize_argv(argv: Sequence[str], parser: argparse.ArgumentParser,
                   legacy: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` with old dashed spellings (``--base-model``) turned into the one spelling
    (``--base_model``) and old key names (``legacy``: ``{"eval_limit": "eval.limit"}``) into
    their key now, each with a deprecation warning; unknown options are left to the parser."""
    known = parser._option_string_actions
    out = []
    for tok in argv:
        opt, eq, value = tok.partition("=")
        if opt.startswith("--") and opt[2:] in (legacy or {}):
            new = "--" + legacy[opt[2:]]  # type: ignore[index]
            logging.getLogger("poc_lora.config").warning("%s is deprecated: the key is now %s", opt, new)
            opt = tok = new + eq + value
        if opt.startswith("--") and opt not in known and _dashed(opt):
            new = "--" + opt[2:].replace("-", "_")
            if new in known:
                logging.getLogger("poc_lora.config").warning(
                    "%s is deprecated: the spelling is %s (underscores)", opt, new)
                tok = new + eq + value
        out.append(tok)
    return out


def _unknown_key_error(key: str, where: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(sorted(valid))}")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a mapping; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value, got {type(data).__name__}")
    return data


__all__ = ["GRAMMAR", "KeyParser", "RaisingArgumentParser", "normalize_argv", "read_yaml"]
