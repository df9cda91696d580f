// Included first by every translated .cu file: the host headers the CUDA sources use, parsed
// before __CUDACC__ / __CUDA_ARCH__ are defined (torch's headers must see a plain host build),
// then the device API.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cudasim/runtime.h"
