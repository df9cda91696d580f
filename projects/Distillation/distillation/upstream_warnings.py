"""Upstream notices that say nothing about a run, kept off the console of the project's scripts.

- fvcore scripts its two focal losses with `torch.jit.script` when detectron2 imports it, and
  torch prints a FutureWarning ("`torch.jit.script` is deprecated") for each: twice in every
  process, before anything else;
- detectron2's anchor generator calls `torch.meshgrid` without `indexing` (a UserWarning at the
  first forward).

Neither is the user's to act on. This package's `__init__` imports detectron2 inside
`importing_upstream()` (the notices are off during those imports only), so the scripts can
import it first; each script then calls `quiet_upstream_notices()` for the rest of its process.
Standard library only: importing it must not import detectron2.
"""
import contextlib
import os
import re
import warnings

# (the start of the message, its category): exactly these notices, nothing else of their kind
UPSTREAM_NOTICES = [
    ("`torch.jit.script` is deprecated", FutureWarning),
    ("torch.meshgrid", UserWarning),
]


def _ignore_notices() -> None:
    for message, category in UPSTREAM_NOTICES:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)


def quiet_upstream_notices(subprocesses: bool = False) -> None:
    """Ignore the UPSTREAM_NOTICES in this process; with `subprocesses`, also in the Python
    processes it starts (through PYTHONWARNINGS, which takes no colon in a message)."""
    _ignore_notices()
    if subprocesses:
        options = [f"ignore:{message}:{category.__name__}"
                   for message, category in UPSTREAM_NOTICES]
        os.environ["PYTHONWARNINGS"] = ",".join(
            filter(None, [os.environ.get("PYTHONWARNINGS", "")] + options))


@contextlib.contextmanager
def importing_upstream():
    """The UPSTREAM_NOTICES ignored inside the block only (the warning filters are restored
    after it): for imports of detectron2 made on a user's behalf."""
    with warnings.catch_warnings():
        _ignore_notices()
        yield
