"""Builds dsig_ext._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit is found.

With a GPU visible to torch, a build without the CUDA kernels is an error unless DSIG_CPU_ONLY=1.

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


def _gpu_visible():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a torch without CUDA support, or no driver
        return False


def cuda_build_plan(env, toolkit_root, gpu_visible):
    """(build the CUDA kernels?, toolkit root) from the environment, the toolkit found and
    whether a GPU is visible. A visible GPU with no usable toolkit is an error, not a silent
    CPU-only build (its ops would then fail on CUDA tensors at run time)."""
    if env.get("DSIG_CPU_ONLY", "0") == "1":
        return False, None
    if toolkit_root is not None:
        return True, toolkit_root
    if env.get("FORCE_CUDA", "0") == "1":
        return True, env.get("CUDA_HOME")
    if gpu_visible:
        raise RuntimeError(
            "dsig_ext: a CUDA GPU is visible but no CUDA toolkit was found (a directory with "
            "bin/nvcc and lib64/libcudart.so*; tried $CUDA_HOME, $CUDA_PATH, /usr/local/cuda*). "
            "Set CUDA_HOME to the toolkit root, or FORCE_CUDA=1 with CUDA_HOME, to build the CUDA "
            "kernels; set DSIG_CPU_ONLY=1 to build the CPU kernels only on purpose.")
    return False, None


def _extra_cuda_includes():
    """cuBLAS/cuSPARSE headers that ATen's CUDA headers include ship in pip's nvidia packages."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cublas", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def get_extension(with_cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    csrc = "csrc"
    sources = [os.path.join(csrc, "dsig.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "cpu", "*.cpp")))
    extra = {"cxx": ["-O3", "-fopenmp"]}
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[str(ROOT / csrc)])
    if not with_cuda:
        return CppExtension("dsig_ext._C", sources, extra_compile_args=extra, **kwargs)
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "cuda", "*.cu")))
    extra["cxx"].append("-DDSIG_WITH_CUDA")
    # nvcc's default -fmad=true contracts a * b + c into one FMA, as in torchvision's CUDA build;
    # the rounding that matters (sample coordinates) is written out in roi_align_common.h.
    # No --use_fast_math: divisions, sqrt and the border rules stay IEEE.
    extra["nvcc"] = ["-O3", "-DDSIG_WITH_CUDA"]
    kwargs["include_dirs"] += _extra_cuda_includes()
    return CUDAExtension("dsig_ext._C", sources, extra_compile_args=extra, **kwargs)


def main():
    toolkit = None if os.environ.get("DSIG_CPU_ONLY", "0") == "1" else _find_cuda_toolkit()
    gpu = _gpu_visible()
    with_cuda, root = cuda_build_plan(os.environ, toolkit, gpu)
    if with_cuda and root:
        os.environ["CUDA_HOME"] = root  # before torch.utils.cpp_extension reads it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    print(f"dsig_ext: CUDA kernels {'on' if with_cuda else 'off'} (toolkit {root}, GPU visible: "
          f"{gpu})")
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="dsig_ext",
        version="0.1.0",
        description="Fused multi-level RoIAlign and cosine-edge loss ops for DSIG distillation",
        packages=find_packages(include=["dsig_ext", "dsig_ext.*"]),
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        ext_modules=[get_extension(with_cuda)],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


# setuptools' PEP 517 backend and `python setup.py` both run this file as __main__; tests
# import it under another name to check the build plan.
if __name__ == "__main__":
    main()
