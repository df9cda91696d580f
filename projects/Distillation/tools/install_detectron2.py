#!/usr/bin/env python
"""Installs detectron2 v0.6 (pure Python, no compiled ops) into the running environment.

detectron2 is not on PyPI under its own name. The sdist ``pb1-detectron2==0.6`` holds exactly
upstream v0.6's Python sources, without ``detectron2/layers/csrc`` and without the model-zoo config
files. This step:

1. does nothing when a working detectron2 is already importable (e.g. one built from upstream);
2. downloads the sdist with pip 23.2.1 (newer pip refuses it: one of its extras declares a direct
   URL dependency); pip 23.2.1 is put in a private folder, the environment's own pip is untouched;
3. installs it with a minimal setup.py of ours (no C++ build) and these compatibility fixes:
   - ``pkg_resources`` (gone from setuptools >= 81, used by model_zoo) -> a small shim;
   - ``Image.LINEAR`` (gone from Pillow >= 10) -> ``Image.BILINEAR`` (its old alias);
   - ``np.int`` / ``np.float`` / ``np.bool`` (gone from numpy >= 1.24) -> builtins;
   - ``from detectron2 import _C`` -> optional import; the features that need it stay
     unavailable (rotated boxes/NMS, RoIAlignRotated, deformable conv) and COCO evaluation uses
     the pycocotools path (``COCOeval_opt`` falls back to ``COCOeval``).
   - ``detectron2.export`` imports its Caffe2 exporter only where ``caffe2`` exists (gone from
     torch >= 2.0), so ``TracingAdapter``, ``scripting_with_instances`` and the TorchScript
     patches import.

With ``--wheel-dir DIR`` it installs nothing and instead writes wheels for an offline machine
(an air-gapped cluster, a bare GPU box): the patched detectron2, its pure-Python dependencies
(built here where PyPI has only sdists) and pycocotools for ``--python-version`` (default: this
interpreter's). There: ``pip install --no-index --find-links DIR detectron2`` (numpy, Pillow,
matplotlib, PyYAML and tensorboard are expected to be installed already).

Usage: python projects/Distillation/tools/install_detectron2.py [--force]
       python projects/Distillation/tools/install_detectron2.py --wheel-dir DIR
                                                                [--python-version 3.12]
"""
import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
OLD_PIP = "pip==23.2.1"
RUNTIME_DEPS = [
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8",
    "tabulate", "cloudpickle", "tqdm>4.29.0", "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.11",
    "omegaconf>=2.1", "hydra-core>=1.1", "tensorboard",
]

# Pure-Python requirements of detectron2 0.6 and fvcore/iopath/hydra that a machine with torch,
# numpy, Pillow, matplotlib, PyYAML and tensorboard may lack; built as py3-none-any wheels.
PURE_WHEELS = [
    "termcolor>=1.1", "yacs>=0.1.8", "tabulate", "cloudpickle", "tqdm>4.29.0",
    "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.11", "omegaconf>=2.1,<2.4", "hydra-core>=1.1",
    "antlr4-python3-runtime==4.9.3", "portalocker", "typing_extensions", "packaging",
]
# Compiled requirements fetched as wheels for the target interpreter.
BINARY_WHEELS = ["pycocotools>=2.0.2"]
MANYLINUX = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]

MINIMAL_SETUP = '''\
# Written by dsig's install_detectron2.py: pure-Python install, no C++ extension.
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="0.6+dsig",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    python_requires=">=3.7",
)
'''

PKG_RESOURCES_SHIM = '''\
class pkg_resources:  # dsig patch: setuptools >= 81 no longer ships pkg_resources
    @staticmethod
    def resource_filename(package, resource):
        import importlib
        return os.path.join(os.path.dirname(importlib.import_module(package).__file__), resource)
'''

OPTIONAL_CAFFE2_EXPORT = '''\
try:  # dsig patch: the Caffe2 exporter needs caffe2, which torch >= 2.0 no longer ships
    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401
except ImportError:
    pass
else:
    from .api import *
'''

OPTIONAL_C = '''\
try:  # dsig patch: this build has no compiled detectron2._C
    from detectron2 import _C
except ImportError:
    _C = None
'''


def detectron2_works() -> bool:
    code = ("import detectron2, detectron2.modeling, detectron2.engine, detectron2.evaluation, "
            "detectron2.model_zoo, detectron2.export")
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def download_sdist(work: Path) -> Path:
    pip_dir = work / "oldpip"
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(pip_dir), OLD_PIP])
    # pip 23.2.1 prepares the sdist's metadata with this interpreter's torch
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from pip._internal.cli.main import main; sys.exit(main(sys.argv[2:]))")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([sys.executable, "-c", code, str(pip_dir), "download", "--no-deps",
         "--no-build-isolation", "--no-binary", ":all:", "-d", str(work / "sdist"), SDIST],
        env=env)
    archives = list((work / "sdist").glob("pb1-detectron2-0.6.tar.gz"))
    if not archives:
        raise SystemExit("install_detectron2: the pb1-detectron2 sdist was not downloaded")
    return archives[0]


def patch_tree(root: Path) -> None:
    pkg = root / "detectron2"
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        new = re.sub(r"\bnp\.(int|float|bool)\b(?![\w.])", r"\1", text)
        new = new.replace("Image.LINEAR", "Image.BILINEAR")
        new = re.sub(r"^from detectron2 import _C\n", OPTIONAL_C, new, flags=re.M)
        if path.name == "model_zoo.py":
            new = new.replace("import pkg_resources\n", PKG_RESOURCES_SHIM)
        if path.relative_to(pkg).as_posix() == "export/__init__.py":
            new = new.replace("from .api import *\n", OPTIONAL_CAFFE2_EXPORT)
        if path.name == "fast_eval_api.py":
            new += ("\n\nif _C is None:  # dsig patch: no compiled evaluator, use pycocotools\n"
                    "    COCOeval_opt = COCOeval  # noqa: F811\n")
        if new != text:
            path.write_text(new)
    (root / "setup.py").write_text(MINIMAL_SETUP)
    for name in ("setup.cfg", "pyproject.toml"):
        (root / name).unlink(missing_ok=True)


def patched_source(work: Path) -> Path:
    """The pb1-detectron2 sdist, unpacked and patched, under `work`."""
    archive = download_sdist(work)
    with tarfile.open(archive) as tar:
        tar.extractall(work / "src", filter="data")
    root = work / "src" / "pb1-detectron2-0.6"
    patch_tree(root)
    return root


def wheel_commands(source: Path, wheel_dir: Path, python_version: str):
    """pip commands that fill `wheel_dir` for an offline install on `python_version`."""
    pip = [sys.executable, "-m", "pip"]
    binary = pip + ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--implementation",
                    "cp", "--python-version", python_version, "-d", str(wheel_dir)]
    for platform in MANYLINUX:
        binary += ["--platform", platform]
    return [
        pip + ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
               str(source)],
        pip + ["wheel", "--quiet", "--no-deps", "-w", str(wheel_dir)] + PURE_WHEELS,
        binary + BINARY_WHEELS,
    ]


def write_wheels(wheel_dir: Path, python_version: str) -> None:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dsig-d2-") as tmp:
        source = patched_source(Path(tmp))
        for cmd in wheel_commands(source, wheel_dir, python_version):
            run(cmd)
    names = sorted(p.name for p in wheel_dir.glob("*.whl"))
    if not any(n.startswith("detectron2-") for n in names):
        raise SystemExit("install_detectron2: no detectron2 wheel was written")
    print(f"install_detectron2: {len(names)} wheels in {wheel_dir}:\n  " + "\n  ".join(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="reinstall even if importable")
    parser.add_argument("--wheel-dir", type=Path, default=None,
                        help="write wheels for an offline install here instead of installing")
    parser.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                        help="interpreter the compiled wheels are for (with --wheel-dir)")
    args = parser.parse_args()
    if args.wheel_dir is not None:
        write_wheels(args.wheel_dir.resolve(), args.python_version)
        return
    if not args.force and detectron2_works():
        print("install_detectron2: a working detectron2 is already importable; nothing to do")
        return
    run([sys.executable, "-m", "pip", "install", "--quiet"] + RUNTIME_DEPS)
    with tempfile.TemporaryDirectory(prefix="dsig-d2-") as tmp:
        root = patched_source(Path(tmp))
        run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", str(root)])
    if not detectron2_works():
        raise SystemExit("install_detectron2: detectron2 was installed but does not import")
    print("install_detectron2: detectron2 0.6 (pure Python) installed")


if __name__ == "__main__":
    main()
