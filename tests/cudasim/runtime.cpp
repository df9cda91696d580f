// cudasim scheduler: blocks run one after another in the selected block order; inside a block
// every CUDA thread is a fiber (its own stack) that runs until it reaches a barrier, a warp collective
// or its end, and runnable fibers are resumed in the selected thread order. Detects barrier
// divergence, warp collectives with missing lanes, launch-limit violations and shared memory
// above the launch's budget; shared memory is garbage at every block's start.
#include "cudasim/runtime.h"
#include "cudasim/control.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDASIM_ASAN 1
#endif
// The tsan build compiles this file uninstrumented with CUDASIM_TSAN=1 (build.py): the
// scheduler's own hand-offs (index registers, fiber states) are not CUDA accesses, and only the
// orderings CUDA guarantees are told to ThreadSanitizer, through its fiber and sync interface.
#if CUDASIM_TSAN
#include <sanitizer/tsan_interface.h>
#endif

// Fiber switch without the signal-mask system calls of swapcontext (x86-64 System V): saves the
// callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack
// pointer in *save and continues on `next`.
extern "C" void cudasim_switch(void** save, void* next);
extern "C" void cudasim_fiber_start();
asm(R"(
  .text
  .globl cudasim_switch
  .type cudasim_switch, @function
cudasim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudasim_switch, .-cudasim_switch

  .globl cudasim_fiber_start
  .type cudasim_fiber_start, @function
cudasim_fiber_start:
  movq %r12, %rdi
  call cudasim_fiber_entry
  ud2
  .size cudasim_fiber_start, .-cudasim_fiber_start
)");

namespace cudasim {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kEntryFrameBytes = 16 * 1024;  // top of a fiber stack: the entry frames
constexpr size_t kDefaultSmemLimit = 48 * 1024;   // without cudaFuncSetAttribute opt-in
constexpr size_t kMaxSmemOptIn = 227 * 1024;      // sm_90

enum class State { Runnable, Barrier, Warp, Exited };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  void* stack = nullptr;
  uint3 tid;
  int linear = 0;
  State state = State::Runnable;
  const char* file = nullptr;  // where it waits
  int line = 0;
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  uint64_t gathered[32] = {};  // WarpOp::Gather's result
  int arg = 0, width = 32;
  unsigned barriers = 0, collectives = 0;  // passed so far in this block (sync-address parity)
#if CUDASIM_TSAN
  void* tsan_fiber = nullptr;
#endif
};

struct SharedBlock {
  int site;
  size_t type_hash;
  void* ptr;
  size_t bytes;
};

struct Options {
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  FillMode fill = FillMode::Random;
  uint64_t launches = 0, blocks = 0, threads = 0;
};

Options g_opt;
uint64_t g_fp_control = 0;  // MXCSR and x87 control word of the launching thread
std::mutex g_launch_mutex;
std::map<const void*, int> g_smem_opt_in;

// State of the running launch / block (one launch at a time).
struct Run {
  const KernelInfo* info = nullptr;
  const LaunchConfig* cfg = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::string error;
  std::vector<SharedBlock> shared;
  void* dynamic = nullptr;
  size_t smem_limit = kDefaultSmemLimit;
  size_t static_bytes = 0;
  std::mt19937_64 rng;
#if CUDASIM_ASAN
  const void* host_stack = nullptr;  // the scheduler's stack, learnt when a fiber starts
  size_t host_stack_size = 0;
#endif
#if CUDASIM_TSAN
  void* tsan_host = nullptr;
  // per block, two addresses each (alternating generations): [0, 1] its barrier, [2 + 2w, 3 + 2w]
  // warp w's collectives
  char* block_sync = nullptr;
  char launch_sync = 0;
  char launch_start = 0;
#endif
} g_run;

std::string where(const char* file, int line) {
  std::ostringstream s;
  s << (file ? file : "?") << ":" << line;
  return s.str();
}

std::string dims(dim3 d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}

std::string thread_name(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.tid.x << ", " << f.tid.y << ", " << f.tid.z << ") of block ("
    << g_block_idx.x << ", " << g_block_idx.y << ", " << g_block_idx.z << ")";
  return s.str();
}

void fill_garbage(void* p, size_t n) {
  unsigned char* b = static_cast<unsigned char*>(p);
  if (g_opt.fill == FillMode::NaN) {
    std::memset(b, 0xff, n);  // NaN in every float type, -1 in every integer
    return;
  }
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t r = g_run.rng();
    std::memcpy(b + i, &r, 8);
  }
  for (; i < n; ++i) b[i] = static_cast<unsigned char>(g_run.rng());
}

// A device-side defect: recorded, then the fiber hands control back and never resumes.
[[noreturn]] void fail_in_fiber(const std::string& what) {
  Run& r = g_run;
  if (r.error.empty()) r.error = what;
  Fiber* f = r.current;
  f->state = State::Exited;
#if CUDASIM_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.host_stack, r.host_stack_size);  // abandoned
#endif
#if CUDASIM_TSAN
  __tsan_switch_to_fiber(r.tsan_host, __tsan_switch_to_fiber_no_sync);
#endif
  cudasim_switch(&f->sp, r.scheduler_sp);
  std::abort();  // never resumed
}

void switch_to_scheduler() {
  Run& r = g_run;
  Fiber* f = r.current;
#if CUDASIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, r.host_stack, r.host_stack_size);
#endif
#if CUDASIM_TSAN
  __tsan_switch_to_fiber(r.tsan_host, __tsan_switch_to_fiber_no_sync);
#endif
  cudasim_switch(&f->sp, r.scheduler_sp);
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(fake, &r.host_stack, &r.host_stack_size);
#endif
}

}  // namespace
}  // namespace cudasim

extern "C" void cudasim_fiber_entry(void* fiber) {
  using namespace cudasim;
  Fiber* f = static_cast<Fiber*>(fiber);
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_run.host_stack, &g_run.host_stack_size);
#endif
#if CUDASIM_TSAN
  __tsan_acquire(&g_run.launch_start);
  if (g_run.dynamic) __tsan_acquire(g_run.dynamic);
#endif
  std::string thrown;
  try {
    g_run.body(g_run.ctx);
  } catch (const std::exception& e) {
    thrown = e.what();
  } catch (...) {
    thrown = "an exception not derived from std::exception";
  }
  // failed outside the handler: the fiber never returns, the exception must be finished first
  if (!thrown.empty()) fail_in_fiber("exception in device code: " + thrown);
#if CUDASIM_TSAN
  __tsan_release(&g_run.launch_sync);  // everything a thread did precedes the next launch
#endif
  f->state = State::Exited;
#if CUDASIM_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_run.host_stack, g_run.host_stack_size);
#endif
#if CUDASIM_TSAN
  __tsan_switch_to_fiber(g_run.tsan_host, __tsan_switch_to_fiber_no_sync);
#endif
  cudasim_switch(&f->sp, g_run.scheduler_sp);
  std::abort();
}

namespace cudasim {
namespace {

void resume(Fiber& f) {
  Run& r = g_run;
  r.current = &f;
  g_thread_idx = f.tid;
#if CUDASIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
#if CUDASIM_TSAN
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  cudasim_switch(&r.scheduler_sp, f.sp);
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  r.current = nullptr;
}

std::vector<void*> g_freed_at_launch_end;  // tsan: see free_shared

void free_shared() {
  for (auto& s : g_run.shared) {
#if CUDASIM_TSAN
    // freeing is a write; only the launch's end orders the block's accesses before it (an
    // earlier ordering would also order this block before the next one)
    g_freed_at_launch_end.push_back(s.ptr);
#else
    std::free(s.ptr);
#endif
  }
  g_run.shared.clear();
#if CUDASIM_TSAN
  g_freed_at_launch_end.push_back(g_run.dynamic);
#else
  std::free(g_run.dynamic);
#endif
  g_run.dynamic = nullptr;
  g_run.static_bytes = 0;
}

// Exactly `bytes` (not rounded up), so AddressSanitizer sees an access one past the end.
void* exact_allocation(size_t bytes, size_t align) {
  void* p = nullptr;
  if (posix_memalign(&p, align, bytes ? bytes : 1) != 0)
    throw std::runtime_error("cudasim: no memory for shared memory");
  return p;
}

void* map_stack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cudasim: no memory for fiber stacks");
  mprotect(p, 4096, PROT_NONE);  // an overflowing fiber faults instead of corrupting another
  return p;
}

std::vector<size_t> ordered(size_t n, Schedule s) {
  std::vector<size_t> o(n);
  for (size_t i = 0; i < n; ++i) o[i] = s == Schedule::Reverse ? n - 1 - i : i;
  if (s == Schedule::Random) std::shuffle(o.begin(), o.end(), g_run.rng);
  return o;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Gather: return "warp-wide matrix operation (wmma)";
  }
  return "?";
}

const char* state_name(State s) {
  switch (s) {
    case State::Runnable: return "running";
    case State::Barrier: return "waiting at __syncthreads()";
    case State::Warp: return "waiting at another warp collective";
    case State::Exited: return "exited";
  }
  return "?";
}

// Completes the warp collectives whose lanes have all arrived; an error if one can never complete.
bool complete_warp_collectives(std::string* error) {
  Run& r = g_run;
  const int n = static_cast<int>(r.fibers.size());
  bool progressed = false;
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    if (f.state != State::Warp) continue;
    const int warp_first = (i / 32) * 32;
    const int lanes = std::min(32, n - warp_first);
    bool ready = true;
    for (int l = 0; l < 32 && ready; ++l) {
      if (!(f.mask >> l & 1u)) continue;
      if (l >= lanes) {
        *error = std::string(op_name(f.op)) + " at " + where(f.file, f.line) + ": mask names lane " +
                 std::to_string(l) + ", which does not exist in a block of " + std::to_string(n) +
                 " threads (" + thread_name(f) + ")";
        return false;
      }
      const Fiber& g = r.fibers[warp_first + l];
      if (g.state == State::Runnable) {
        ready = false;
      } else if (g.state != State::Warp || g.op != f.op || g.mask != f.mask) {
        if (g.state == State::Warp) continue;  // judged below if it never completes
        *error = std::string(op_name(f.op)) + " at " + where(f.file, f.line) + " with mask 0x" +
                 [&] { char b[16]; std::snprintf(b, sizeof b, "%08x", f.mask); return std::string(b); }() +
                 ": lane " + std::to_string(l) + " of the mask is " + state_name(g.state) +
                 " (" + thread_name(f) + ")";
        if (g.state == State::Barrier) *error += "; it waits at " + where(g.file, g.line);
        return false;
      }
    }
    if (!ready) continue;
    for (int l = 0; l < 32; ++l)
      if ((f.mask >> l & 1u) && (r.fibers[warp_first + l].op != f.op ||
                                  r.fibers[warp_first + l].mask != f.mask)) ready = false;
    if (!ready) continue;
    // every lane of the mask is here: compute each lane's result
    uint64_t ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((f.mask >> l & 1u) && r.fibers[warp_first + l].value) ballot |= uint64_t(1) << l;
    for (int l = 0; l < 32; ++l) {
      if (!(f.mask >> l & 1u)) continue;
      Fiber& g = r.fibers[warp_first + l];
      const int w = g.width;
      const int seg = (l / w) * w;
      int src = l;
      switch (g.op) {
        case WarpOp::Sync: break;
        case WarpOp::Ballot: g.result = ballot; break;
        case WarpOp::Any: g.result = ballot != 0; break;
        case WarpOp::All: g.result = ballot == (f.mask & 0xffffffffu); break;
        case WarpOp::Shfl: src = seg + (g.arg % w + w) % w; break;
        // deltas are unsigned in CUDA; a lane beyond the segment gets its own value
        case WarpOp::ShflUp:
          src = unsigned(l - seg) >= unsigned(g.arg) ? l - g.arg : l;
          break;
        case WarpOp::ShflDown:
          src = uint64_t(l - seg) + unsigned(g.arg) < unsigned(w) ? l + g.arg : l;
          break;
        case WarpOp::ShflXor:  // earlier segments may be read, later ones give the own value
          src = l ^ (g.arg & 31);
          if (src >= seg + w) src = l;
          break;
        case WarpOp::Gather:
          for (int m = 0; m < 32; ++m)
            g.gathered[m] = (f.mask >> m & 1u) ? r.fibers[warp_first + m].value : g_run.rng();
          break;
      }
      if (g.op >= WarpOp::Shfl && g.op <= WarpOp::ShflXor) {
        // reading a lane outside the mask is undefined in CUDA: garbage here
        g.result = (f.mask >> src & 1u) ? r.fibers[warp_first + src].value : g_run.rng();
      }
    }
    for (int l = 0; l < 32; ++l)
      if (f.mask >> l & 1u) r.fibers[warp_first + l].state = State::Runnable;
    progressed = true;
  }
  return progressed;
}

std::string deadlock_report() {
  Run& r = g_run;
  int exited = 0, barrier = 0, warp = 0;
  const Fiber* first_exited = nullptr;
  std::map<std::string, int> sites;
  const Fiber* first_warp = nullptr;
  for (const Fiber& f : r.fibers) {
    if (f.state == State::Exited) {
      ++exited;
      if (!first_exited) first_exited = &f;
    } else if (f.state == State::Barrier) {
      ++barrier;
      ++sites[where(f.file, f.line)];
    } else if (f.state == State::Warp) {
      ++warp;
      if (!first_warp) first_warp = &f;
    }
  }
  std::ostringstream s;
  if (first_warp) {
    s << op_name(first_warp->op) << " at " << where(first_warp->file, first_warp->line)
      << " can never complete: lanes of its mask are missing (" << thread_name(*first_warp)
      << "; " << barrier << " threads at barriers, " << exited << " exited)";
    return s.str();
  }
  s << "barrier divergence: ";
  if (sites.size() > 1) {
    s << "threads wait at different __syncthreads():";
    for (auto& kv : sites) s << " " << kv.second << " at " << kv.first << ";";
  } else {
    s << barrier << " threads wait at __syncthreads() (" << sites.begin()->first << ") while "
      << exited << " threads of the block have exited (first: " << thread_name(*first_exited)
      << ")";
  }
  return s.str();
}

void run_block(unsigned bx, unsigned by, unsigned bz) {
  Run& r = g_run;
  const LaunchConfig& cfg = *r.cfg;
  g_block_idx = {bx, by, bz};
  const size_t n = r.fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.state = State::Runnable;
    f.barriers = f.collectives = 0;

#if CUDASIM_ASAN
    // the frames of the stack's last fiber ended by a switch, not a return: their redzones stay
    __asan_unpoison_memory_region(static_cast<char*>(f.stack) + kStackBytes - kEntryFrameBytes,
                                  kEntryFrameBytes);
#endif
    // a frame as cudasim_switch leaves it, returning into cudasim_fiber_start with r12 = &f
    uint64_t* top = reinterpret_cast<uint64_t*>(static_cast<char*>(f.stack) + kStackBytes);
    top -= 2;            // 16-byte aligned after the return
    *--top = reinterpret_cast<uint64_t>(&cudasim_fiber_start);
    *--top = 0;          // rbp
    *--top = 0;          // rbx
    *--top = reinterpret_cast<uint64_t>(&f);  // r12
    *--top = 0;          // r13
    *--top = 0;          // r14
    *--top = 0;          // r15
    *--top = g_fp_control;  // MXCSR (low half), x87 control word (high half)
    f.sp = top;
  }
#if CUDASIM_TSAN
  r.block_sync = new char[66];  // fresh addresses: blocks do not synchronise with each other
#endif
  if (cfg.dynamic_smem > 0) {
    r.dynamic = exact_allocation(cfg.dynamic_smem, 16);
    fill_garbage(r.dynamic, cfg.dynamic_smem);
#if CUDASIM_TSAN
    __tsan_release(r.dynamic);  // acquired by each thread at its start
#endif
  }
  for (;;) {
    bool ran = false;
    for (size_t i : ordered(n, g_opt.schedule)) {
      if (r.fibers[i].state != State::Runnable) continue;
      resume(r.fibers[i]);
      ran = true;
      if (!r.error.empty()) goto done;
    }
    if (ran) continue;
    if (std::all_of(r.fibers.begin(), r.fibers.end(),
                    [](const Fiber& f) { return f.state == State::Exited; }))
      break;
    {
      std::string err;
      if (complete_warp_collectives(&err)) continue;
      if (!err.empty()) {
        r.error = err;
        break;
      }
    }
    // a barrier completes when every thread of the block waits at the same one
    const Fiber& f0 = r.fibers[0];
    const bool all_here = std::all_of(r.fibers.begin(), r.fibers.end(), [&](const Fiber& f) {
      return f.state == State::Barrier && f.file == f0.file && f.line == f0.line;
    });
    if (!all_here) {
      r.error = deadlock_report();
      break;
    }
    for (Fiber& f : r.fibers) f.state = State::Runnable;
  }
done:
#if CUDASIM_TSAN
  delete[] r.block_sync;
#endif
  free_shared();
  g_opt.blocks += 1;
  g_opt.threads += n;
}

void check_launch(const KernelInfo& info, const LaunchConfig& cfg, const void* kernel_id) {
  std::ostringstream err;
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0)
    err << "invalid configuration: empty grid " << dims(g) << " or block " << dims(b);
  else if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    err << "grid " << dims(g) << " exceeds the limits (2^31 - 1, 65535, 65535)";
  else if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024)
    err << "block " << dims(b) << " exceeds the limits (1024 threads, z <= 64)";
  else if (info.max_threads > 0 && threads > uint64_t(info.max_threads))
    err << "block of " << threads << " threads exceeds __launch_bounds__(" << info.max_threads
        << ")";
  else {
    auto it = g_smem_opt_in.find(kernel_id);
    const size_t limit = it == g_smem_opt_in.end() ? kDefaultSmemLimit : size_t(it->second);
    if (cfg.dynamic_smem > limit)
      err << cfg.dynamic_smem << " bytes of dynamic shared memory exceed the " << limit
          << " bytes allowed" << (it == g_smem_opt_in.end() ? " without cudaFuncSetAttribute "
                                                             "opt-in" : "");
  }
  if (!err.str().empty())
    throw std::runtime_error(std::string("cudasim: launch of ") + info.name + " at " +
                             where(info.file, info.line) + " fails: " + err.str());
}

}  // namespace

void set_max_dynamic_smem(const void* kernel_id, int bytes) {
  if (bytes < 0 || size_t(bytes) > kMaxSmemOptIn)
    throw std::runtime_error("cudasim: cudaFuncSetAttribute asks for " + std::to_string(bytes) +
                             " bytes of dynamic shared memory (sm_90 allows 227 KB)");
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_smem_opt_in[kernel_id] = bytes;
}

void run_launch(const KernelInfo& info, const LaunchConfig& cfg, const void* kernel_id,
                void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  check_launch(info, cfg, kernel_id);
  Run& r = g_run;
  r.info = &info;
  r.cfg = &cfg;
  r.body = body;
  r.ctx = ctx;
  r.error.clear();
  r.rng.seed(g_opt.seed * 0x9E3779B97F4A7C15ull + g_opt.launches);
  {
    auto it = g_smem_opt_in.find(kernel_id);
    r.smem_limit = it == g_smem_opt_in.end() ? kDefaultSmemLimit : size_t(it->second);
  }
  const size_t n = size_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  if (r.fibers.size() != n) {
    for (Fiber& f : r.fibers) {
#if CUDASIM_ASAN
      // the shadow outlives the mapping: memory mapped here later must not look like a stack
      __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
#if CUDASIM_TSAN
      __tsan_destroy_fiber(f.tsan_fiber);
#endif
      munmap(f.stack, kStackBytes);
    }
    r.fibers.assign(n, Fiber{});
    for (Fiber& f : r.fibers) {
      f.stack = map_stack();
#if CUDASIM_TSAN
      // one ThreadSanitizer fiber per stack, kept across blocks: its accesses to its own stack
      // are program-ordered (the price: lane i of one block is ordered before lane i of the next)
      f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
  }
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = static_cast<int>(i);
    f.tid = {static_cast<unsigned>(i % cfg.block.x),
             static_cast<unsigned>((i / cfg.block.x) % cfg.block.y),
             static_cast<unsigned>(i / (size_t(cfg.block.x) * cfg.block.y))};
  }
  g_block_dim = cfg.block;
  g_grid_dim = cfg.grid;
  {
    uint32_t mxcsr;
    uint16_t fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    g_fp_control = mxcsr | (uint64_t(fpcw) << 32);
  }
#if CUDASIM_TSAN
  r.tsan_host = __tsan_get_current_fiber();
  __tsan_release(&r.launch_start);  // what the host did before the launch precedes every thread
#endif
  const uint64_t blocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  std::vector<size_t> order;
  if (g_opt.schedule == Schedule::Random) order = ordered(blocks, Schedule::Random);
  for (uint64_t i = 0; i < blocks && r.error.empty(); ++i) {
    const uint64_t b = g_opt.schedule == Schedule::Random ? order[i]
                       : g_opt.schedule == Schedule::Reverse ? blocks - 1 - i : i;
    run_block(static_cast<unsigned>(b % cfg.grid.x),
              static_cast<unsigned>((b / cfg.grid.x) % cfg.grid.y),
              static_cast<unsigned>(b / (uint64_t(cfg.grid.x) * cfg.grid.y)));
  }
#if CUDASIM_TSAN
  __tsan_acquire(&r.launch_sync);  // launches on one stream are ordered
  for (void* p : g_freed_at_launch_end) std::free(p);
  g_freed_at_launch_end.clear();
#endif
  g_opt.launches += 1;
  if (!r.error.empty()) {
#if CUDASIM_ASAN
    // abandoned fibers leave poisoned frames anywhere on their stacks
    for (Fiber& f : r.fibers) __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
#if CUDASIM_TSAN
    for (Fiber& f : r.fibers) {  // and unfinished call stacks
      __tsan_destroy_fiber(f.tsan_fiber);
      f.tsan_fiber = __tsan_create_fiber(0);
    }
#endif
    std::string msg = "cudasim: kernel " + std::string(info.name) + " (launched at " +
                      where(info.file, info.line) + ", grid " + dims(cfg.grid) + ", block " +
                      dims(cfg.block) + "): " + r.error;
    r.error.clear();
    throw std::runtime_error(msg);
  }
}

void* shared_allocation(int site, size_t type_hash, size_t bytes, size_t align) {
  Run& r = g_run;
  for (auto& s : r.shared) {
    if (s.site == site && s.type_hash == type_hash) {
#if CUDASIM_TSAN
      __tsan_acquire(s.ptr);  // the allocation precedes every thread's use
#endif
      return s.ptr;
    }
  }
#if CUDASIM_TSAN
  // allocated by the block (the host fiber), not by the first thread that declares it
  __tsan_switch_to_fiber(r.tsan_host, __tsan_switch_to_fiber_no_sync);
#endif
  r.static_bytes += bytes;
  // without opt-in a block has 48 KB in all; with it, dynamic up to the opt-in, 227 KB in all
  const size_t total = r.smem_limit > kDefaultSmemLimit ? kMaxSmemOptIn : kDefaultSmemLimit;
  if (r.static_bytes + r.cfg->dynamic_smem > total)
    fail_in_fiber("static (" + std::to_string(r.static_bytes) + " bytes) plus dynamic (" +
                  std::to_string(r.cfg->dynamic_smem) + " bytes) shared memory exceed the " +
                  std::to_string(total) + " bytes a block may use");
  void* p = exact_allocation(bytes, std::max<size_t>(align, 16));
  fill_garbage(p, bytes);
  r.shared.push_back({site, type_hash, p, bytes});
#if CUDASIM_TSAN
  __tsan_release(p);
  __tsan_switch_to_fiber(r.current->tsan_fiber, __tsan_switch_to_fiber_no_sync);
  __tsan_acquire(p);
#endif
  return p;
}

void* dynamic_shared_allocation() { return g_run.dynamic; }

void syncthreads(const char* file, int line) {
  Fiber* f = g_run.current;
  f->state = State::Barrier;
  f->file = file;
  f->line = line;
#if CUDASIM_TSAN
  char* sync = g_run.block_sync + (f->barriers++ & 1);  // see warp_collective
  __tsan_release(sync);
#endif
  switch_to_scheduler();
#if CUDASIM_TSAN
  __tsan_acquire(sync);
#endif
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line) {
  Fiber* f = g_run.current;
  const int lane = f->linear % 32;
  if (!(mask >> lane & 1u))
    fail_in_fiber(std::string(op_name(op)) + " at " + where(file, line) + ": the calling lane " +
                  std::to_string(lane) + " is not in its mask (" + thread_name(*f) + ")");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail_in_fiber(std::string(op_name(op)) + " at " + where(file, line) + ": width " +
                  std::to_string(width) + " is not a power of two <= 32");
  f->state = State::Warp;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->file = file;
  f->line = line;
#if CUDASIM_TSAN
  // a lane released into the next generation's address before a slower lane acquired this one
  // would pass it what it did after the collective
  char* sync = g_run.block_sync + 2 + 2 * ((f->linear / 32) % 32) + (f->collectives++ & 1);
  __tsan_release(sync);
#endif
  switch_to_scheduler();
#if CUDASIM_TSAN
  __tsan_acquire(sync);
#endif
  return f->result;
}

void warp_gather(unsigned mask, uint64_t value, uint64_t (&all)[32], const char* file, int line) {
  warp_collective(WarpOp::Gather, mask, value, 0, 32, file, line);
  std::memcpy(all, g_run.current->gathered, sizeof all);
}

void report_device_error(const char* what, const char* file, int line) {
  fail_in_fiber(std::string(what) + " at " + where(file, line) + " (" +
                thread_name(*g_run.current) + ")");
}

// --- control (control.h) ---
void configure(Schedule s, uint64_t seed, FillMode fill) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_opt.schedule = s;
  g_opt.seed = seed;
  g_opt.fill = fill;
}

Counters counters() { return {g_opt.launches, g_opt.blocks, g_opt.threads}; }

void fill_new_allocation(void* p, size_t n) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  fill_garbage(p, n);
}

}  // namespace cudasim
