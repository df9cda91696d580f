// cudasim stand-in for CUDAGuard: like the real one, a guard for a device of another type is an
// internal error (so argument checks must come before it).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_INTERNAL_ASSERT(device.type() == c10::DeviceType::PrivateUse1,
                          "CUDAGuard for a device of type ", device.type());
  }
  explicit CUDAGuard(c10::DeviceIndex) {}
};

struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device> device) {
    if (device) CUDAGuard g(*device);
  }
};

}  // namespace cuda
}  // namespace c10
