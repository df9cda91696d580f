// The executor's <mma.h>: CUDA's warp-wide matrix operations (nvcuda::wmma) with float
// accumulation, as warp collectives of the 32 lanes: 16 x 16 x 16 for 16-bit inputs, 16 x 16 x 8
// for TF32 (float storage, rounded by __float_to_tf32 as cvt.rna.tf32.f32 does).
//
// A fragment spreads its tile over the lanes: element e of the row-major tile (M x K for A,
// K x N for B, M x N for the accumulator) is slot e / 32 of lane e % 32. CUDA's own spread differs and is unspecified, so kernels must not read
// fragment elements by position (elementwise maps such as the TF32 rounding are fine). Every operation needs all 32 lanes, as in CUDA: a
// missing lane is reported like a divergent __syncwarp. mma_sync reads the other lanes' A and B
// fragments through their addresses (one gather), adds the products of each output in k order
// with float rounding (the products of two 16-bit values are exact in float), and ends with a
// __syncwarp so that no lane overwrites a fragment another lane still reads.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cudasim/runtime.h"

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

constexpr int kFragmentSlots = 16 * 16 / 32;  // an accumulator's slots per lane

namespace precision {
struct tf32 {};
}  // namespace precision

// Round to TF32 (10 mantissa bits), to nearest with ties away from zero; kept in a float.
inline float __float_to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

template <typename Use, int M, int N, int K>
struct tile_dims;
template <int M, int N, int K>
struct tile_dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K>
struct tile_dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K>
struct tile_dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename T>
struct storage { using type = T; };
template <>
struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8),
                "cudasim wmma: only the 16 x 16 x 16 and 16 x 16 x 8 shapes");
  static constexpr int rows = tile_dims<Use, M, N, K>::rows, cols = tile_dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  typename storage<T>::type x[num_elements];
};

namespace detail {

inline int lane() {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(linear % 32);
}

// Offset of tile element (r, c) in memory of leading dimension ldm.
inline int64_t offset(int r, int c, unsigned ldm, bool row_major_memory) {
  return row_major_memory ? int64_t(r) * ldm + c : int64_t(c) * ldm + r;
}

template <typename Layout>
constexpr bool is_row_major() {
  return std::is_same<Layout, row_major>::value;
}

template <typename Frag, typename P>
void load(Frag& f, const P* p, unsigned ldm, bool row_major_memory, const char* file, int line) {
  ::cudasim::warp_collective(::cudasim::WarpOp::Sync, 0xffffffffu, 0, 0, 32, file, line);
  const int l = lane();
  for (int s = 0; s < Frag::num_elements; ++s) {
    const int e = s * 32 + l;
    f.x[s] = p[offset(e / Frag::cols, e % Frag::cols, ldm, row_major_memory)];
  }
}

}  // namespace detail

template <typename Use, int K, typename T, typename Layout>
void load_matrix_sync_at(fragment<Use, 16, 16, K, T, Layout>& f,
                         const typename storage<T>::type* p, unsigned ldm, const char* file,
                         int line) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators load with a layout_t");
  detail::load(f, p, ldm, detail::is_row_major<Layout>(), file, line);
}
template <int K>
void load_matrix_sync_at(fragment<accumulator, 16, 16, K, float>& f, const float* p,
                         unsigned ldm, layout_t layout, const char* file, int line) {
  detail::load(f, p, ldm, layout == mem_row_major, file, line);
}

template <int K>
void store_matrix_sync_at(float* p, const fragment<accumulator, 16, 16, K, float>& f,
                          unsigned ldm, layout_t layout, const char* file, int line) {
  ::cudasim::warp_collective(::cudasim::WarpOp::Sync, 0xffffffffu, 0, 0, 32, file, line);
  const int l = detail::lane();
  for (int s = 0; s < kFragmentSlots; ++s) {
    const int e = s * 32 + l;
    p[detail::offset(e / 16, e % 16, ldm, layout == mem_row_major)] = f.x[s];
  }
}

template <typename Use, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, 16, 16, K, T, Layout>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename storage<T>::type>(v);
}

template <int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync_at(fragment<accumulator, 16, 16, K, float>& d,
                 const fragment<matrix_a, 16, 16, K, T, LayoutA>& a,
                 const fragment<matrix_b, 16, 16, K, T, LayoutB>& b,
                 const fragment<accumulator, 16, 16, K, float>& c, const char* file, int line) {
  using S = typename storage<T>::type;
  struct Operands {
    const S* a;
    const S* b;
  };
  const Operands mine{a.x, b.x};
  uint64_t all[32];
  ::cudasim::warp_gather(0xffffffffu, reinterpret_cast<uintptr_t>(&mine), all, file, line);
  auto element = [&](bool of_a, int r, int col) {  // row-major element (r, col) of A or B
    const int e = r * (of_a ? K : 16) + col;
    const Operands* src = reinterpret_cast<const Operands*>(all[e % 32]);
    return static_cast<float>((of_a ? src->a : src->b)[e / 32]);
  };
  const int l = detail::lane();
  float out[kFragmentSlots];
  for (int s = 0; s < kFragmentSlots; ++s) {
    const int e = s * 32 + l, r = e / 16, col = e % 16;
    float v = c.x[s];
    for (int k = 0; k < K; ++k) v += element(true, r, k) * element(false, k, col);
    out[s] = v;
  }
  ::cudasim::warp_collective(::cudasim::WarpOp::Sync, 0xffffffffu, 0, 0, 32, file, line);
  for (int s = 0; s < kFragmentSlots; ++s) d.x[s] = out[s];
}

}  // namespace wmma
}  // namespace nvcuda

// The call site of each operation is the source's (file and line, like __syncwarp).
#define load_matrix_sync(...) load_matrix_sync_at(__VA_ARGS__, __FILE__, __LINE__)
#define store_matrix_sync(...) store_matrix_sync_at(__VA_ARGS__, __FILE__, __LINE__)
#define mma_sync(...) mma_sync_at(__VA_ARGS__, __FILE__, __LINE__)
