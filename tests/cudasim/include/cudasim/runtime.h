// cudasim: executes the project's CUDA source on the CPU (test infrastructure, see ../../README.md).
//
// The translator (translate.py) turns a .cu file into C++ that includes this header: kernel
// launches `k<<<grid, block, smem, stream>>>(args)` become cudasim::launch(...), `__shared__`
// declarations become per-block allocations (static_shared / dynamic_shared). Every CUDA thread of
// a block is a fiber with its own threadIdx; fibers switch only at barriers, warp collectives and
// exit, in the order the selected schedule gives (runtime.cpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

namespace cudasim {

// Where a kernel comes from: its name, __launch_bounds__ (0: none) and the launch site.
struct KernelInfo {
  const char* name;
  int max_threads;
  const char* file;
  int line;
};

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem;
};

inline LaunchConfig config(dim3 grid, dim3 block, size_t smem = 0) { return {grid, block, smem}; }
template <typename Stream>
LaunchConfig config(dim3 grid, dim3 block, size_t smem, const Stream&) {
  return {grid, block, smem};
}

// Index registers of the running fiber (set by the scheduler at every switch).
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Runs the kernel body once per thread of every block of the grid; throws std::runtime_error
// naming the kernel, block and thread on any detected defect.
void run_launch(const KernelInfo& info, const LaunchConfig& cfg, const void* kernel_id,
                void (*body)(void*), void* ctx);

template <typename F>
void call_body(void* f) {
  (*static_cast<F*>(f))();
}

template <typename... P, typename... A>
void launch(const KernelInfo& info, void (*kernel)(P...), const LaunchConfig& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "cudasim: kernel launched with a wrong argument count");
  // a kernel's parameters are copies made at launch, converted as the kernel declares them
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  run_launch(info, cfg, reinterpret_cast<const void*>(kernel), &call_body<decltype(body)>, &body);
}

// --- shared memory: one allocation per block and declaration, garbage-filled at block start ---
void* shared_allocation(int site, size_t type_hash, size_t bytes, size_t align);
void* dynamic_shared_allocation();

template <typename T, size_t Align = alignof(T)>  // Align: the declaration's __align__
T& static_shared(int site) {
  constexpr size_t align = Align > alignof(T) ? Align : alignof(T);
  return *static_cast<T*>(shared_allocation(site, typeid(T).hash_code(), sizeof(T), align));
}
template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_allocation());
}

// --- barriers and warp collectives (file/line of the call: the source's, via #line) ---
void syncthreads(const char* file, int line);
enum class WarpOp { Sync, Ballot, Any, All, Shfl, ShflUp, ShflDown, ShflXor, Gather };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line);
// Every lane of `mask` gets all[l] = lane l's value (garbage for lanes outside the mask): the
// emulated tensor-core operations (include/mma.h) exchange their fragments' addresses with it.
void warp_gather(unsigned mask, uint64_t value, uint64_t (&all)[32], const char* file, int line);
void report_device_error(const char* what, const char* file, int line);

template <typename T>
T shuffle(WarpOp op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "cudasim: shuffle type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_collective(op, mask, bits, arg, width, file, line);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// --- atomics: real atomic read-modify-writes, so a race detector sees them as such ---
template <typename T>
T atomic_add(T* address, T v) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, v, __ATOMIC_RELAXED);
  } else {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits* a = reinterpret_cast<Bits*>(address);
    Bits old = __atomic_load_n(a, __ATOMIC_RELAXED);
    for (;;) {
      T cur;
      std::memcpy(&cur, &old, sizeof(T));
      const T next = cur + v;
      Bits nb;
      std::memcpy(&nb, &next, sizeof(T));
      if (__atomic_compare_exchange_n(a, &old, nb, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return cur;
    }
  }
}

// CUDA's single-precision fma is fused in float; the double overload of <math.h> would round
// the float case through double.
inline float fma_(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double fma_(double a, double b, double c) { return std::fma(a, b, c); }

// Per-kernel opt-in to more than 48 KB of dynamic shared memory (cudaFuncSetAttribute).
void set_max_dynamic_smem(const void* kernel_id, int bytes);

}  // namespace cudasim

// --- the CUDA device API as kernels see it ---
#define threadIdx (::cudasim::g_thread_idx)
#define blockIdx (::cudasim::g_block_idx)
#define blockDim (::cudasim::g_block_dim)
#define gridDim (::cudasim::g_grid_dim)
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#define __syncthreads() ::cudasim::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) \
  ((void)::cudasim::warp_collective(::cudasim::WarpOp::Sync, ::cudasim::syncwarp_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
#define __ballot_sync(mask, pred) \
  (static_cast<unsigned>(::cudasim::warp_collective(::cudasim::WarpOp::Ballot, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__)))
#define __any_sync(mask, pred) \
  (static_cast<int>(::cudasim::warp_collective(::cudasim::WarpOp::Any, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__)))
#define __all_sync(mask, pred) \
  (static_cast<int>(::cudasim::warp_collective(::cudasim::WarpOp::All, (mask), (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__)))
#define __shfl_sync(mask, v, src, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::Shfl, (mask), (v), (src), ::cudasim::shfl_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::ShflUp, (mask), (v), (d), ::cudasim::shfl_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::ShflDown, (mask), (v), (d), ::cudasim::shfl_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::ShflXor, (mask), (v), (m), ::cudasim::shfl_width(__VA_ARGS__), __FILE__, __LINE__)
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)
#define __trap() ::cudasim::report_device_error("__trap()", __FILE__, __LINE__)

namespace cudasim {
inline unsigned syncwarp_mask(unsigned mask = 0xffffffffu) { return mask; }
inline int shfl_width(int width = 32) { return width; }
}  // namespace cudasim

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }

inline float atomicAdd(float* a, float v) { return ::cudasim::atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return ::cudasim::atomic_add(a, v); }
inline int atomicAdd(int* a, int v) { return ::cudasim::atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return ::cudasim::atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return ::cudasim::atomic_add(a, v);
}

// CUDA's min/max overloads: integer and floating arguments of mixed widths meet in their common
// type (std::min would not compile for int64 vs int); floating ones are fmin/fmax (a NaN operand
// gives the other one).
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmin(C(a), C(b));
  else return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmax(C(a), C(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    ::cudasim::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "cudasim"; }
