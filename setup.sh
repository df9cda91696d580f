#!/usr/bin/env bash
# Zero-to-running set-up: creates .venv/ at the repository root, installs every dependency,
# detectron2 (projects/Distillation/tools/install_detectron2.py) and builds dsig_ext from source.
# Idempotent: each step is skipped while its inputs are unchanged, so a second run takes seconds.
# Environment: PYTHON (interpreter for the venv, default python3), DSIG_CPU_ONLY / FORCE_CUDA /
# CUDA_HOME / TORCH_CUDA_ARCH_LIST (see setup.py).
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES=(
  "torch==2.14.1" "torchvision==0.29.1"
  ninja pybind11 numpy pycocotools matplotlib pytest "hypothesis>=6" setuptools wheel
  # tools/predict.py draws with detectron2's Visualizer, which imports cv2; export_student.py
  # --format onnx needs onnx, and its check (and the test) onnxruntime
  opencv-python-headless onnx onnxruntime
)
STAMPS=.setup-stamps
mkdir -p "$STAMPS"
VPY=.venv/bin/python

stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }

if [ ! -x "$VPY" ]; then
  echo "[setup] creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi

deps_key=$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -d' ' -f1)
if ! stamp_ok deps "$deps_key"; then
  echo "[setup] installing Python packages"
  "$VPY" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
  echo "$deps_key" > "$STAMPS/deps"
fi

d2_key=$(sha256sum projects/Distillation/tools/install_detectron2.py | cut -d' ' -f1)
if ! stamp_ok detectron2 "$d2_key"; then
  echo "[setup] installing detectron2"
  "$VPY" projects/Distillation/tools/install_detectron2.py
  echo "$d2_key" > "$STAMPS/detectron2"
fi

ext_key=$( (find csrc -type f | sort | xargs sha256sum; sha256sum setup.py pyproject.toml;
            env | grep -E '^(DSIG_CPU_ONLY|FORCE_CUDA|CUDA_HOME|TORCH_CUDA_ARCH_LIST)=' || true) \
          | sha256sum | cut -d' ' -f1)
if ! stamp_ok extension "$ext_key" || ! ls dsig_ext/_C*.so > /dev/null 2>&1; then
  echo "[setup] building dsig_ext (C++ and, where a CUDA toolkit is found, CUDA kernels)"
  "$VPY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
  echo "$ext_key" > "$STAMPS/extension"
fi

"$VPY" -c "import dsig_ext, sys; sys.exit(0 if dsig_ext.extension_available() else 1)" \
  || { echo "[setup] dsig_ext does not import; remove $STAMPS and rerun" >&2; exit 1; }
echo "[setup] ready: $("$VPY" -c 'import torch, dsig_ext; print(f"torch {torch.__version__}, dsig_ext {dsig_ext.__version__}, CUDA kernels built: {dsig_ext.cuda_kernels_built()}")')"
