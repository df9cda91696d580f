"""Weight files named in configs, resolved to local files.

- a local path: used as it is;
- ``detectron2://NAME``: detectron2's model zoo (https://dl.fbaipublicfiles.com/detectron2/NAME),
  downloaded once into iopath's cache (``$FVCORE_CACHE``, default ``~/.torch/iopath_cache``);
- ``torchvision://ARCH[/WEIGHTS]``: torchvision's ImageNet weights of a student backbone
  (resnet18/50/101/152, mobilenet_v2, efficientnet_b0; default IMAGENET1K_V1), downloaded once
  into torch hub's cache (``$TORCH_HOME``), converted to this project's names and cached.

Without network access (or with ``DSIG_OFFLINE=1``) a form whose file is not cached fails at once
with the config key, the URL to fetch and the path to put it at; nothing hangs and nothing starts
from random weights. `locate` says where a form's file is or would come from without fetching
anything (train_net's --check).
"""
import os
import re
import socket
from collections import OrderedDict
from urllib.parse import urlparse

import torch

from .errors import InputError, MissingFileError

TORCHVISION = "torchvision://"
DETECTRON2 = "detectron2://"
ZOO_URL = "https://dl.fbaipublicfiles.com/detectron2/"

ARCHS = ("resnet18", "resnet50", "resnet101", "resnet152", "mobilenet_v2", "efficientnet_b0")
# the last `features` block the detection backbones use (the 1280-channel head is dropped)
LAST_FEATURE_BLOCK = {"mobilenet_v2": 17, "efficientnet_b0": 7}
# ImageNet files of the original DSIG repository's own student layouts (LAYOUT "original")
ORIGINAL_LAYOUT_ARCHS = ("tonylins_mobilenet_v2", "lukemelas_efficientnet_b0")
# checkpoint "__author__" of converted backbones: they must fill the student's backbone exactly
CONVERTED_AUTHORS = ("torchvision", "original-layout")


class WeightsUnavailableError(InputError, RuntimeError):
    pass


# what a smoke test without the file sets, per config key
RANDOM_INIT_OVERRIDES = {
    "MODEL.WEIGHTS": "MODEL.WEIGHTS ''",
    "DISTILL.TEACHER.WEIGHTS": "DISTILL.TEACHER.WEIGHTS '' DISTILL.TEACHER.ALLOW_RANDOM_INIT True",
}


# --- torchvision checkpoints -> this project's backbone names ---------------------------------

def _resnet_key(k: str):
    if k.startswith("fc.") or k.endswith("num_batches_tracked"):
        return None
    k = re.sub(r"^conv1\.", "stem.conv1.", k)
    k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", k)
    if m:
        stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
        rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
        rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
        rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
        k = f"res{stage}.{block}.{rest}"
    return "backbone.bottom_up." + k


def _features_key(k: str, last_block: int):
    if k.endswith("num_batches_tracked"):
        return None
    m = re.match(r"^features\.(\d+)\.", k)
    if not m or int(m.group(1)) > last_block:
        return None  # classifier and the dropped head conv
    return "backbone.bottom_up." + k


def _original_layout_key(arch: str, k: str):
    if arch == "tonylins_mobilenet_v2":
        return _features_key(k, LAST_FEATURE_BLOCK["mobilenet_v2"])
    if k.startswith(("_conv_head.", "_bn1.", "_fc.")) or k.endswith("num_batches_tracked"):
        return None  # lukemelas: the head conv, its norm and the classifier
    return "backbone.bottom_up." + k


def convert(arch: str, state_dict) -> "OrderedDict[str, torch.Tensor]":
    """A torchvision ImageNet state dict (or, for ORIGINAL_LAYOUT_ARCHS, an ImageNet file of the
    original repository's student layouts) as ``backbone.bottom_up.*`` student weights."""
    if arch not in ARCHS + ORIGINAL_LAYOUT_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; supported: {ARCHS + ORIGINAL_LAYOUT_ARCHS}")
    out = OrderedDict()
    for k, v in state_dict.items():
        if arch in ORIGINAL_LAYOUT_ARCHS:
            new = _original_layout_key(arch, k)
        elif arch.startswith("resnet"):
            new = _resnet_key(k)
        else:
            new = _features_key(k, LAST_FEATURE_BLOCK[arch])
        if new is not None:
            out[new] = v.detach().clone()
    if not out:
        raise ValueError(f"no {arch} weights found in the checkpoint")
    return out


# --- resolution -----------------------------------------------------------------------------

def _offline_reason(url: str, timeout: float = 5.0):
    """Why `url` cannot be fetched from here (None when its host answers)."""
    if os.environ.get("DSIG_OFFLINE", "0") == "1":
        return "DSIG_OFFLINE=1"
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host} is unreachable: {e}"


def unavailable_message(key: str, form: str, url: str, local_path: str, reason: str) -> str:
    """What to do about a weights form that cannot be fetched here: the key, URL and path."""
    key = key or "the config key naming it"
    smoke = RANDOM_INIT_OVERRIDES.get(key)
    return (f"{key} {form} needs {url}, which cannot be downloaded here ({reason}). Download it "
            f"on a machine with internet access and put it at {local_path}, or set {key} to a "
            "local copy of the weights"
            + (f"; for a smoke test without it, override {smoke} (random weights)" if smoke
               else "")
            + ". `./start_train.sh check CONFIG` lists every file a config needs.")


def _require(url: str, local_path: str, form: str, key: str = "") -> bool:
    """True when `local_path` exists; else raises unless `url` can be fetched."""
    if os.path.isfile(local_path):
        return True
    reason = _offline_reason(url)
    if reason:
        raise WeightsUnavailableError(unavailable_message(key, form, url, local_path, reason))
    return False


def torchvision_weights(name: str):
    """(arch, torchvision weights enum member) of ``ARCH[/WEIGHTS]``."""
    import torchvision

    arch, _, which = name.partition("/")
    if arch not in ARCHS:
        raise ValueError(f"{TORCHVISION}{name}: unknown backbone {arch!r}; supported: "
                         f"{', '.join(ARCHS)}")
    enum = torchvision.models.get_model_weights(arch)
    try:
        return arch, enum[which or "IMAGENET1K_V1"]
    except KeyError:
        raise ValueError(f"{TORCHVISION}{name}: {arch} has weights "
                         f"{', '.join(w.name for w in enum)}") from None


def _torchvision_paths(form: str):
    """(arch, weights enum, downloaded file, converted file) of a ``torchvision://`` form."""
    arch, weights = torchvision_weights(form[len(TORCHVISION):])
    hub = torch.hub.get_dir()
    out = os.path.join(hub, "dsig", f"{arch}-{weights.name}-detectron2.pth")
    source = os.path.join(hub, "checkpoints", os.path.basename(weights.url))
    return arch, weights, source, out


def torchvision_init_file(form: str, key: str = "") -> str:
    """Local student initialisation file of a ``torchvision://`` form (downloaded, converted
    and cached on first use)."""
    arch, weights, source, out = _torchvision_paths(form)
    if os.path.isfile(out):
        return out
    if not _require(weights.url, source, form, key):
        os.makedirs(os.path.dirname(source), exist_ok=True)
        torch.hub.download_url_to_file(weights.url, source, progress=False)
    state = torch.load(source, map_location="cpu", weights_only=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.save({"model": convert(arch, state), "__author__": "torchvision", "__arch__": arch,
                "__source__": form}, out)
    return out


def zoo_cache_path(form: str) -> str:
    """Where iopath keeps the file of a ``detectron2://`` form."""
    from iopath.common.file_io import get_cache_dir

    path = urlparse(ZOO_URL + form[len(DETECTRON2):]).path.lstrip("/")
    return os.path.join(get_cache_dir(), path)


def zoo_file(form: str, key: str = "") -> str:
    from detectron2.utils.file_io import PathManager

    _require(ZOO_URL + form[len(DETECTRON2):], zoo_cache_path(form), form, key)
    return PathManager.get_local_path(form)


def resolve_weights(path: str, key: str = "") -> str:
    """The local file of a weights form (see the module docstring); `key` (the config key that
    names it) goes into the error when it cannot be fetched."""
    if path.startswith(TORCHVISION):
        return torchvision_init_file(path, key)
    if path.startswith(DETECTRON2):
        return zoo_file(path, key)
    return path


def require_weights(form: str, key: str) -> str:
    """The local file of config key `key`'s weights form: fetched now where needed; an error
    naming the key when it cannot be, or when a local file is not there."""
    path = resolve_weights(form, key)
    if not os.path.isfile(path):
        raise MissingFileError(f"{key} {form}: file not found; set {key} to the weights file "
                               f"({RANDOM_INIT_OVERRIDES[key]} for a smoke test with random "
                               "weights)")
    return path


def locate(form: str) -> dict:
    """Where the file of a weights form is, or where it would come from, without fetching
    anything: {"kind": "none" | "local" | "detectron2" | "torchvision", "path": the local file
    (None where it is not here), "url" and "cache" (the file it would be downloaded to) for the
    downloadable forms, "converted" for torchvision (the detectron2-named copy made from the
    download), "reason" (why it cannot be downloaded here; None when it can, or is here)}."""
    if not form:
        return {"kind": "none", "path": None}
    if form.startswith(TORCHVISION):
        _, weights, source, out = _torchvision_paths(form)
        here = out if os.path.isfile(out) else source if os.path.isfile(source) else None
        return {"kind": "torchvision", "path": here, "url": weights.url, "cache": source,
                "converted": out, "reason": None if here else _offline_reason(weights.url)}
    if form.startswith(DETECTRON2):
        url, cache = ZOO_URL + form[len(DETECTRON2):], zoo_cache_path(form)
        here = cache if os.path.isfile(cache) else None
        return {"kind": "detectron2", "path": here, "url": url, "cache": cache,
                "reason": None if here else _offline_reason(url)}
    return {"kind": "local", "path": form if os.path.isfile(form) else None}


def register_torchvision_handler() -> None:
    """Let detectron2's PathManager (and so any detectron2 checkpointer) open torchvision://."""
    from detectron2.utils.file_io import PathManager
    from iopath.common.file_io import PathHandler

    class TorchvisionHandler(PathHandler):
        def _get_supported_prefixes(self):
            return [TORCHVISION]

        def _get_local_path(self, path, **kwargs):
            return torchvision_init_file(path)

        def _open(self, path, mode="r", **kwargs):
            return PathManager.open(torchvision_init_file(path), mode, **kwargs)

    try:
        PathManager.register_handler(TorchvisionHandler())
    except (AssertionError, ValueError, KeyError):
        pass  # registered already
