// Planted defects for the cudasim self-test (tests/test_cuda_executor.py): each kernel holds one
// defect that a detector of the executor must catch, beside a correct twin where one makes sense.
// torch.ops.cudasim_selftest.run(case, out) launches case `case` writing into `out` (int32 on the
// simulated device).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <string>

namespace {

constexpr int kBlock = 64;

// out[b * kBlock + t] = value written by the neighbouring thread into shared memory.
template <bool kBarrier>
__global__ void neighbour_kernel(int* out) {
  __shared__ int buf[kBlock];
  buf[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
  if (kBarrier) __syncthreads();
  out[blockIdx.x * kBlock + threadIdx.x] = buf[(threadIdx.x + 1) % kBlock];
}

// Reads shared memory nobody wrote.
__global__ void uninitialised_shared_kernel(int* out) {
  __shared__ int buf[kBlock];
  __syncthreads();
  out[blockIdx.x * kBlock + threadIdx.x] = buf[threadIdx.x];
}

// Thread 0 leaves before the barrier the others wait at.
__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();  // planted: exit before barrier
  out[threadIdx.x] = 1;
}

// Two different barriers for the two halves of the block.
__global__ void divergent_barriers_kernel(int* out) {
  if (threadIdx.x < kBlock / 2) {
    __syncthreads();  // planted: divergent barriers
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// A full-warp ballot after lane 5 exited.
__global__ void ballot_exited_lane_kernel(int* out) {
  if (threadIdx.x % 32 == 5) return;
  const unsigned m = __ballot_sync(0xffffffffu, threadIdx.x % 2 == 0);  // planted: exited lane
  out[threadIdx.x] = static_cast<int>(m);
}

// Correct warp collectives: ballot, shuffle down reduction, shuffle broadcast.
__global__ void warp_ops_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  const unsigned m = __ballot_sync(0xffffffffu, lane % 3 == 0);
  int v = lane;
  for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xffffffffu, v, d);
  const int first = __shfl_sync(0xffffffffu, v, 0);
  const int up = __shfl_up_sync(0xffffffffu, lane, 3);        // lane - 3, own below 3
  const int x8 = __shfl_xor_sync(0xffffffffu, lane, 5, 8);    // within groups of 8
  out[threadIdx.x] = lane == 0 ? static_cast<int>(m) : (lane == 1 ? first : __popc(m));
  out[kBlock + threadIdx.x] = up * 100 + x8;
}

// Writes one element past the end of its output.
__global__ void global_out_of_bounds_kernel(int* out, int n) {
  out[n] = 1;
}

// Writes one element past the end of a shared array.
__global__ void shared_out_of_bounds_kernel(int* out) {
  __shared__ int buf[kBlock];
  buf[threadIdx.x + 1] = 1;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// Writes one element past the end of the launch's dynamic shared memory.
__global__ void dynamic_shared_out_of_bounds_kernel(int* out) {
  extern __shared__ int dyn[];
  dyn[threadIdx.x + 1] = 1;  // planted: past the launch's dynamic shared memory
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x];
}

// Between two barriers each thread overwrites the word its left neighbour reads.
__global__ void race_between_barriers_kernel(int* out) {
  __shared__ int buf[kBlock];
  buf[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  const int v = buf[(threadIdx.x + 1) % kBlock];
  buf[threadIdx.x] = v;  // planted: race between barriers
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// Two threads write one shared word between the same barriers (a race; the result happens to
// be the same under every schedule, so only a race detector sees it).
__global__ void shared_race_kernel(int* out) {
  __shared__ int flag;
  if (threadIdx.x < 2) flag = 7;
  __syncthreads();
  out[threadIdx.x] = flag;
}

__global__ void __launch_bounds__(128) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

__global__ void dynamic_shared_kernel(int* out) {
  extern __shared__ int dyn[];
  dyn[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x];
}

at::Tensor run(const std::string& which, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous(), "int32 contiguous out");
  int* o = out.data_ptr<int>();
  const int n = static_cast<int>(out.numel());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (which == "neighbour") neighbour_kernel<true><<<n / kBlock, kBlock, 0, stream>>>(o);
  else if (which == "missing_barrier") neighbour_kernel<false><<<n / kBlock, kBlock, 0, stream>>>(o);
  else if (which == "uninitialised_shared") uninitialised_shared_kernel<<<n / kBlock, kBlock>>>(o);
  else if (which == "exit_before_barrier") exit_before_barrier_kernel<<<1, kBlock>>>(o);
  else if (which == "divergent_barriers") divergent_barriers_kernel<<<1, kBlock>>>(o);
  else if (which == "ballot_exited_lane") ballot_exited_lane_kernel<<<1, kBlock>>>(o);
  else if (which == "warp_ops") warp_ops_kernel<<<1, kBlock>>>(o);
  else if (which == "global_out_of_bounds") global_out_of_bounds_kernel<<<1, 1>>>(o, n);
  else if (which == "shared_out_of_bounds") shared_out_of_bounds_kernel<<<1, kBlock>>>(o);
  else if (which == "dynamic_shared_out_of_bounds")
    dynamic_shared_out_of_bounds_kernel<<<1, kBlock, kBlock * sizeof(int)>>>(o);
  else if (which == "race_between_barriers") race_between_barriers_kernel<<<1, kBlock>>>(o);
  else if (which == "shared_race") shared_race_kernel<<<1, kBlock>>>(o);
  else if (which == "too_many_threads") bounded_kernel<<<1, 2048>>>(o);
  else if (which == "launch_bounds") bounded_kernel<<<1, 256>>>(o);
  else if (which == "grid_y") bounded_kernel<<<dim3(1, 70000), 1>>>(o);
  else if (which == "empty_grid") bounded_kernel<<<0, 32>>>(o);
  else if (which == "dynamic_smem_48k") dynamic_shared_kernel<<<1, kBlock, 64 * 1024>>>(o);
  else if (which == "dynamic_smem_opt_in") {
    cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         64 * 1024);
    dynamic_shared_kernel<<<1, kBlock, 64 * 1024>>>(o);
  } else TORCH_CHECK(false, "unknown self-test case ", which);
  return out;
}

}  // namespace

TORCH_LIBRARY(cudasim_selftest, m) { m.def("run(str which, Tensor out) -> Tensor"); }
TORCH_LIBRARY_IMPL(cudasim_selftest, CUDA, m) { m.impl("run", &run); }
