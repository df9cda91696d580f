"""Reading config files: safe YAML by default, `_BASE_` inheritance.

detectron2 silently falls back to unsafe YAML loading (which executes Python tags such as
`!!python/object/apply:eval`); here a tag is refused with the file, line and what to write
instead, unless the caller opts in (`allow_unsafe=True`, train_net's --allow-unsafe-yaml).
A file that is not there (the config or a `_BASE_` it names), is not YAML or is not a mapping is
an InputError naming the file (and the line), not a parser traceback.
"""
import os
from typing import Any, Dict

import yaml

from .errors import ConfigError, InputError, MissingFileError

BASE_KEY = "_BASE_"


class UnsafeYAMLError(InputError, ValueError):
    pass


class YAMLSyntaxError(ConfigError):
    """A config file that is not valid YAML, or not a mapping of config keys."""


def _where(path: str, mark) -> str:
    """`path:line:column` of a YAML error mark (1-based), `path` without one."""
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path


def _load_one(path: str, allow_unsafe: bool, named_by: str = "") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise MissingFileError(f"config file {path} not found" + (f" ({named_by})" if named_by
                                                                   else ""))
    with open(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        if allow_unsafe:
            data = yaml.unsafe_load(text)
        else:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else "?"
            raise UnsafeYAMLError(
                f"{path}:{line}: refusing the YAML tag {e.problem.split()[-1] if e.problem else ''}"
                " (Python tags execute code when loaded). Write the value out instead, e.g. "
                "ANCHOR_GENERATOR.SIZES: [[32, 40.3175, 50.7968], [64, 80.6349, 101.5937], ...] "
                "for 3 anchor scales per octave; or, if you trust this file, pass "
                "--allow-unsafe-yaml (allow_unsafe=True).") from None
    except yaml.YAMLError as e:  # a syntax error: where the parser stopped, and why
        problem, context = getattr(e, "problem", None), getattr(e, "context", None)
        start = getattr(e, "context_mark", None)
        if context and start is not None:
            context += f" that starts at line {start.line + 1}, column {start.column + 1}"
        message = f"{problem} ({context})" if problem and context else problem or str(e)
        raise YAMLSyntaxError(f"{_where(path, getattr(e, 'problem_mark', None))}: not valid "
                              f"YAML: {message}") from None
    if data is not None and not isinstance(data, dict):
        raise YAMLSyntaxError(f"{path}: a config file is a mapping of config keys (MODEL: ...), "
                              f"this one holds a {type(data).__name__}")
    return data or {}


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config(path: str, allow_unsafe: bool = False) -> Dict[str, Any]:
    """The config file as a nested dict, its `_BASE_` chain merged (base first)."""
    return _read(path, allow_unsafe, "")


def _read(path: str, allow_unsafe: bool, named_by: str) -> Dict[str, Any]:
    data = _load_one(path, allow_unsafe, named_by)
    base = data.pop(BASE_KEY, None)
    if base:
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        data = _merge(_read(base, allow_unsafe, f"the {BASE_KEY} of {path}"), data)
    return data


def merge_into(cfg, data: Dict[str, Any], path: str) -> None:
    """Merge a config file's keys (`read_config(path)`) into the detectron2 config `cfg`; a key
    `cfg` lacks or a value of the wrong type is a ConfigError naming the file, not yacs's
    traceback."""
    try:
        cfg.merge_from_other_cfg(type(cfg)(data))
    except (KeyError, ValueError, AssertionError) as e:
        message = e.args[0] if e.args else repr(e)
        raise ConfigError(f"{path}: {message} (see detectron2's config reference and "
                          "distillation/config.py for the keys)") from None
