"""Builds dsig_ext._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit is found.

Environment:
  DSIG_CPU_ONLY=1         never build the CUDA kernels
  FORCE_CUDA=1            build them even if no toolkit was detected (CUDA_HOME must then be right)
  CUDA_HOME               toolkit root (the directory whose lib64 holds libcudart)
  TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX"
"""
import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _has_cudart(root):
    return any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def _find_cuda_toolkit():
    """A toolkit root holding both nvcc and libcudart. nvcc on PATH may be a wrapper script, from
    which torch would guess the wrong root, so candidates are checked for the runtime library."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return os.path.realpath(root)
    return None


def _want_cuda():
    if os.environ.get("DSIG_CPU_ONLY", "0") == "1":
        return False, None
    root = _find_cuda_toolkit()
    if root is not None:
        os.environ["CUDA_HOME"] = root  # before torch.utils.cpp_extension reads it
        return True, root
    return os.environ.get("FORCE_CUDA", "0") == "1", os.environ.get("CUDA_HOME")


WITH_CUDA, CUDA_ROOT = _want_cuda()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extra_cuda_includes():
    """cuBLAS/cuSPARSE headers that ATen's CUDA headers include ship in pip's nvidia packages."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cublas", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def get_extension():
    csrc = "csrc"
    sources = [os.path.join(csrc, "dsig.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "cpu", "*.cpp")))
    extra = {"cxx": ["-O3", "-fopenmp"]}
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[str(ROOT / csrc)])
    if not WITH_CUDA:
        return CppExtension("dsig_ext._C", sources, extra_compile_args=extra, **kwargs)
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "cuda", "*.cu")))
    extra["cxx"].append("-DDSIG_WITH_CUDA")
    # no fast math: level assignment and border rules must match torch bit for bit
    extra["nvcc"] = ["-O3", "-DDSIG_WITH_CUDA"]
    kwargs["include_dirs"] += _extra_cuda_includes()
    return CUDAExtension("dsig_ext._C", sources, extra_compile_args=extra, **kwargs)


setup(
    name="dsig_ext",
    version="0.1.0",
    description="Fused multi-level RoIAlign and cosine-edge loss ops for DSIG distillation",
    packages=find_packages(include=["dsig_ext", "dsig_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=[get_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
