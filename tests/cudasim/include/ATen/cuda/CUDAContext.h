// cudasim stand-in for ATen's CUDA context: one simulated H100-like device, one stream.
#pragma once

#include <ATen/ATen.h>

#include "cudasim/runtime.h"

namespace at {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

struct DeviceProp {
  int multiProcessorCount = 132;  // H100 SXM
  int maxThreadsPerBlock = 1024;
  size_t sharedMemPerBlock = 48 * 1024;
  size_t sharedMemPerBlockOptin = 227 * 1024;
  int warpSize = 32;
  int major = 9, minor = 0;
};

inline DeviceProp* getCurrentDeviceProperties() {
  static DeviceProp prop;
  return &prop;
}

}  // namespace cuda
}  // namespace at
