"""Reading config files: safe YAML by default, `_BASE_` inheritance.

detectron2 silently falls back to unsafe YAML loading (which executes Python tags such as
`!!python/object/apply:eval`); here a tag is refused with the file, line and what to write
instead, unless the caller opts in (`allow_unsafe=True`, train_net's --allow-unsafe-yaml).
"""
import os
from typing import Any, Dict

import yaml

from .errors import InputError

BASE_KEY = "_BASE_"


class UnsafeYAMLError(InputError, ValueError):
    pass


def _load_one(path: str, allow_unsafe: bool) -> Dict[str, Any]:
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
    data = _load_one(path, allow_unsafe)
    base = data.pop(BASE_KEY, None)
    if base:
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        data = _merge(read_config(base, allow_unsafe), data)
    return data
