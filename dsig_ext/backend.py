"""Process-wide choice between the fused ops and their pure-PyTorch reference twins."""
import contextlib
import os

BACKENDS = ("fused", "reference")
_backend = os.environ.get("DSIG_BACKEND", "fused")
if _backend not in BACKENDS:
    raise ValueError(f"DSIG_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select "fused" (compiled dsig_ext ops) or "reference" (pure PyTorch, per-level and
    per-graph loops as detectron2 and the original DSIG code compute them)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select a backend: ``with dsig_ext.use_backend("reference"): ...``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(backend):
    name = get_backend() if backend is None else backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name
