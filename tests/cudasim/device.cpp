// The simulated GPU as a torch device: PrivateUse1 (renamed "cudasim" from Python). Its memory is
// host memory (the kernels run on the CPU), filled with garbage when allocated so a kernel that
// reads what nobody wrote shows it. Ops without a kernel here run on the CPU through torch's CPU
// fallback; the project's dsig ops get the translated CUDA kernels (TORCH_LIBRARY_IMPL(dsig,
// PrivateUse1, ...) in the translated .cu files).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <ATen/native/TensorFactories.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/view_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/set_native.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "cudasim/control.h"

namespace cudasim {
namespace {

constexpr c10::DeviceType kSim = c10::DeviceType::PrivateUse1;

void free_sim(void* p) { std::free(p); }

struct SimAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = n ? std::malloc(n) : nullptr;
    TORCH_CHECK(n == 0 || p, "cudasim: out of memory (", n, " bytes)");
    if (n) fill_new_allocation(p, n);
    return {p, p, &free_sim, c10::Device(kSim, 0)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_sim; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

SimAllocator g_allocator;

struct SimGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kSim; }
  c10::Device exchangeDevice(c10::Device) const override { return c10::Device(kSim, 0); }
  c10::Device getDevice() const override { return c10::Device(kSim, 0); }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.type() == kSim && (d.index() == 0 || d.index() == -1),
                "cudasim: there is one simulated device, got ", d);
  }
  void uncheckedSetDevice(c10::Device) const noexcept override {}
  c10::Stream getStream(c10::Device d) const noexcept override {
    return c10::Stream(c10::Stream::DEFAULT, c10::Device(kSim, 0));
  }
  c10::Stream exchangeStream(c10::Stream s) const noexcept override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, SimGuard);

// What the autograd engine and factories ask of a PrivateUse1 backend.
struct SimHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex) const override {
    return at::detail::getDefaultCPUGenerator();
  }
  at::Device getDeviceFromPtr(void*) const override { return c10::Device(kSim, 0); }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
};

const bool g_hooks_registered = [] {
  at::RegisterPrivateUse1HooksInterface(new SimHooks());
  return true;
}();

at::Tensor empty_sim(at::IntArrayRef size, std::optional<at::ScalarType> dtype,
                     std::optional<at::Layout>, std::optional<at::Device>, std::optional<bool>,
                     std::optional<at::MemoryFormat> memory_format) {
  return at::detail::empty_generic(size, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided_sim(at::IntArrayRef size, at::IntArrayRef stride,
                             std::optional<at::ScalarType> dtype, std::optional<at::Layout>,
                             std::optional<at::Device>, std::optional<bool>) {
  return at::detail::empty_strided_generic(size, stride, &g_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

// The simulated device's memory is host memory: a CPU tensor over the same bytes.
at::Tensor host_alias(const at::Tensor& t) {
  if (t.is_cpu()) return t;
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), t.options().device(at::kCPU));
}

at::Tensor copy_from_sim(const at::Tensor& self, const at::Tensor& dst, bool /*non_blocking*/) {
  TORCH_CHECK(self.sizes() == dst.sizes(), "cudasim copy: sizes differ");
  if (dst.numel() == 0) return dst;
  host_alias(dst).copy_(host_alias(self));
  return dst;
}

at::Tensor copy_from_and_resize_sim(const at::Tensor& self, const at::Tensor& dst) {
  at::native::resize_(dst, self.sizes(), std::nullopt);
  return copy_from_sim(self, dst, false);
}

const at::Tensor& resize_sim(const at::Tensor& self, at::IntArrayRef size,
                             std::optional<at::MemoryFormat> memory_format) {
  return at::native::resize_(self, size, memory_format);
}

at::Tensor as_strided_sim(const at::Tensor& self, at::IntArrayRef size, at::IntArrayRef stride,
                          std::optional<int64_t> storage_offset) {
  return at::native::as_strided_tensorimpl(self, size, stride, storage_offset);
}

at::Tensor& set_source_storage_sim(at::Tensor& self, c10::Storage source, int64_t offset,
                                   at::IntArrayRef size, at::IntArrayRef stride) {
  return at::native::set_storage_cpu_(self, source, offset, size, stride);
}

void fallback_to_cpu(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  at::native::cpu_fallback(op, stack);
}

}  // namespace
}  // namespace cudasim

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", &cudasim::empty_sim);
  m.impl("empty_strided", &cudasim::empty_strided_sim);
  m.impl("_copy_from", &cudasim::copy_from_sim);
  m.impl("_copy_from_and_resize", &cudasim::copy_from_and_resize_sim);
  m.impl("resize_", &cudasim::resize_sim);
  m.impl("as_strided", &cudasim::as_strided_sim);
  m.impl("view", &at::native::view);
  m.impl("_reshape_alias", &at::native::_reshape_alias);
  m.impl("set_.source_Storage_storage_offset", &cudasim::set_source_storage_sim);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&cudasim::fallback_to_cpu>());
}

// Control from Python: torch.ops.cudasim.*
namespace cudasim {
namespace {
void configure_op(const std::string& schedule, int64_t seed, const std::string& fill) {
  Schedule s;
  if (schedule == "forward") s = Schedule::Forward;
  else if (schedule == "reverse") s = Schedule::Reverse;
  else if (schedule == "random") s = Schedule::Random;
  else TORCH_CHECK(false, "cudasim: unknown schedule '", schedule, "' (forward, reverse, random)");
  FillMode f;
  if (fill == "random") f = FillMode::Random;
  else if (fill == "nan") f = FillMode::NaN;
  else TORCH_CHECK(false, "cudasim: unknown fill '", fill, "' (random, nan)");
  configure(s, static_cast<uint64_t>(seed), f);
}

std::vector<int64_t> counters_op() {
  const Counters c = counters();
  return {int64_t(c.launches), int64_t(c.blocks), int64_t(c.threads)};
}
}  // namespace
}  // namespace cudasim

TORCH_LIBRARY(cudasim, m) {
  m.def("configure(str schedule, int seed, str fill) -> ()", &cudasim::configure_op);
  m.def("counters() -> int[]", &cudasim::counters_op);
}
