"""Loads the compiled operator library and registers its Python-side kernels."""

import torch  # noqa: F401  (loads libtorch before the extension)

_LOAD_ERROR = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.dsig.*)
except ImportError as e:  # the reference backend still works without it
    _LOAD_ERROR = e
else:
    from . import _meta_registrations  # noqa: F401
    from . import _autograd_registrations  # noqa: F401

BUILD_HINT = (
    "the compiled extension dsig_ext._C is not available ({err}). Build it from the repository "
    "root with `pip install --no-build-isolation -e .` (or run ./scripts/setup.sh), or select "
    "the pure-PyTorch path with dsig_ext.set_backend('reference')."
)


def extension_available() -> bool:
    """True when the compiled ops are loaded."""
    return _LOAD_ERROR is None


def require_extension() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError("dsig_ext: " + BUILD_HINT.format(err=_LOAD_ERROR))


def cuda_kernels_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    if _LOAD_ERROR is not None:
        return False

    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "dsig::multilevel_roi_align", "CUDA"
    )
