// A CPU emulation of the small part of CUDA that diffcam's kernels use, so that csrc/cuda/*.cu
// can be compiled by the host compiler (g++ -x c++ -DDIFFCAM_CUDA_EMU -I csrc/cuda/emu) and
// tested against the float64 reference on machines without a GPU (tests/refine/cuda_emu.py).
// It stands in for <cuda_runtime.h> and is never used by the real CUDA build.
//
// Execution model: a launch runs its blocks one after the other on the calling thread; the
// threads of a block are fibers (ucontext) scheduled round-robin.  A fiber runs until it reaches
// __syncthreads() or a warp-level exchange (__shfl_xor_sync), or returns.  A block barrier opens
// when every thread of the block that has not returned waits at it (threads that returned count
// as arrived, as on sm_70+); a warp exchange opens when every live thread of that warp (32
// consecutive linear thread ids) waits at it.  Two faults are reported as a launch failure
// instead of hanging or passing silently: a state where nothing can run ("deadlock", e.g. part
// of a warp at a shuffle while the rest waits at __syncthreads), and threads of one block
// waiting at different __syncthreads() calls ("divergent", told apart by file:line, so helpers
// inlined at several places share one site).  Shared memory: `__shared__` locals become
// function statics (blocks never overlap, so one copy serves every block in turn); dynamic
// shared memory is one buffer per launch.  Launch checks as on an sm_90 device: 1..1024 threads
// per block, a non-empty grid, dynamic shared memory above 48 KiB only after
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) and never above the opt-in limit (227 KiB);
// the static `__shared__` bytes are unknown here, so a launch whose dynamic part stays under 48
// KiB but whose total does not (it needs the opt-in on a GPU) is not caught.  Device pointers
// are host pointers; streams are ignored (launches are synchronous).
//
// Fibers switch only at barriers, so an unsynchronised access pair between threads of a block
// gives the "sequential" answer there; the thread mode (-DDCEMU_THREADS: OS threads, one pool
// per launch, mutex rendezvous for barriers and, per warp, for shuffles) exists to be built
// with -fsanitize=thread, which reports such pairs as data races (tests/refine/test_cuda.py).
// What emulation does not show: the timing, the device's own libm (1-ulp differences in exp),
// and the memory model of warps without __syncwarp().
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#ifdef DCEMU_THREADS
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#endif
#include <map>
#include <array>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define DIFFCAM_CUDA_EMU_HEADER 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace dcemu {

struct Dim3 {
  unsigned x, y, z;
  constexpr Dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

}  // namespace dcemu

using dim3 = dcemu::Dim3;
using uint3 = dcemu::Dim3;

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ------------------------------------------------------------------ runtime API subset
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace dcemu {

constexpr int kOptinSmem = 227 * 1024;  // sm_90
constexpr int kDefaultSmem = 48 * 1024;
constexpr size_t kStack = 128 * 1024;  // per fiber; pages are mapped lazily

struct State {
  cudaError_t last = cudaSuccess;
  std::string detail;
  int device = 0;
  std::map<const void*, int> max_dyn_smem;  // cudaFuncSetAttribute
};
inline State& state() {
  static State s;  // the API is used from one Python thread at a time in the tests
  return s;
}

inline void fail(cudaError_t e, std::string why) {
  State& s = state();
  if (s.last == cudaSuccess) {
    s.last = e;
    s.detail = std::move(why);
  }
}

enum FiberState : int { kRun = 0, kBlockBarrier = 1, kWarpBarrier = 2, kDone = 3 };

struct Fiber {
  ucontext_t ctx;
  int state = kRun;
  dim3 tid;
  unsigned char xchg[8];
  const char* site = "";  // file:line of the barrier the fiber waits at
  int line = 0;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t main_ctx;
  int cur = 0;
  const std::function<void()>* body = nullptr;
};

inline thread_local BlockRun* g_run = nullptr;
inline thread_local unsigned char* g_dyn_smem = nullptr;

inline unsigned char* dynamic_smem() { return g_dyn_smem; }

inline void fiber_main() {
  BlockRun* r = g_run;
  (*r->body)();
  r->fibers[r->cur].state = kDone;
  swapcontext(&r->fibers[r->cur].ctx, &r->main_ctx);
}

// Park the current fiber in `st` (waiting at the barrier of file:line) and return to the
// scheduler.
inline void park(int st, const char* file = "", int line = 0) {
  BlockRun* r = g_run;
  Fiber& f = r->fibers[r->cur];
  f.state = st;
  f.site = file;
  f.line = line;
  swapcontext(&f.ctx, &r->main_ctx);
}

// Run one block: every thread executes body(); false (and an error) on deadlock.
inline bool run_block(const dim3& bdim, const std::function<void()>& body, unsigned char* stacks) {
  const int nt = static_cast<int>(bdim.x * bdim.y * bdim.z);
  BlockRun r;
  r.body = &body;
  r.fibers.resize(nt);
  for (int i = 0; i < nt; ++i) {
    Fiber& f = r.fibers[i];
    f.tid = dim3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks + static_cast<size_t>(i) * kStack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  BlockRun* saved = g_run;
  g_run = &r;
  bool ok = true;
  for (;;) {
    for (int i = 0; i < nt; ++i) {
      if (r.fibers[i].state != kRun) continue;
      r.cur = i;
      threadIdx = r.fibers[i].tid;
      swapcontext(&r.main_ctx, &r.fibers[i].ctx);
    }
    int done = 0, at_block = 0;
    for (const Fiber& f : r.fibers) done += f.state == kDone, at_block += f.state == kBlockBarrier;
    if (done == nt) break;
    bool released = false;
    for (int w0 = 0; w0 < nt; w0 += 32) {  // warp exchanges first
      const int w1 = std::min(nt, w0 + 32);
      int live = 0, waiting = 0;
      for (int i = w0; i < w1; ++i) {
        live += r.fibers[i].state != kDone;
        waiting += r.fibers[i].state == kWarpBarrier;
      }
      if (live > 0 && waiting == live) {
        for (int i = w0; i < w1; ++i)
          if (r.fibers[i].state == kWarpBarrier) r.fibers[i].state = kRun;
        released = true;
      }
    }
    if (!released && at_block == nt - done) {
      // every waiting thread must wait at the same __syncthreads(): one inside code that
      // diverges within the block is undefined behaviour in CUDA
      const Fiber* first = nullptr;
      for (const Fiber& f : r.fibers) {
        if (f.state != kBlockBarrier) continue;
        if (!first) {
          first = &f;
        } else if (f.line != first->line || std::strcmp(f.site, first->site) != 0) {
          char buf[400];
          std::snprintf(buf, sizeof buf,
                        "divergent __syncthreads in block (%u,%u,%u): thread %u waits at %s:%d, "
                        "thread %u at %s:%d", blockIdx.x, blockIdx.y, blockIdx.z, first->tid.x,
                        first->site, first->line, f.tid.x, f.site, f.line);
          fail(cudaErrorLaunchFailure, buf);
          g_run = saved;
          return false;
        }
      }
      for (Fiber& f : r.fibers)
        if (f.state == kBlockBarrier) f.state = kRun;
      released = true;
    }
    if (!released) {
      char buf[160];
      std::snprintf(buf, sizeof buf,
                    "deadlock in block (%u,%u,%u): %d threads at __syncthreads, %d returned, "
                    "%d at a warp exchange", blockIdx.x, blockIdx.y, blockIdx.z, at_block, done,
                    nt - done - at_block);
      fail(cudaErrorLaunchFailure, buf);
      ok = false;
      break;
    }
  }
  g_run = saved;
  return ok;
}

#ifdef DCEMU_THREADS
// ---- thread mode (-DDCEMU_THREADS, for ThreadSanitizer): every thread of a block is an OS
// thread that runs concurrently with the others (one pool per launch, reused block after
// block); barriers and warp exchanges are mutex / condition-variable rendezvous
// (synchronisation TSan understands), so any pair of accesses to shared or global memory by
// two threads of a block, one of them a write, with no barrier between them is reported as a
// data race.  A rendezvous that never completes (120 s) is a
// deadlock: reported on stderr, then abort().
inline void t_wait(std::condition_variable& cv, std::unique_lock<std::mutex>& lk,
                   unsigned long* gen_ptr, unsigned long g, const char* what);

// A rendezvous of `live` threads: the block's barrier, or one warp's exchange (which orders
// the accesses of that warp's threads only).  Every member is called with `mu` held.
struct Rendezvous {
  std::mutex mu;
  std::condition_variable cv;
  int live = 0, arrived = 0;
  unsigned long gen = 0;
  void arrive(std::unique_lock<std::mutex>& lk, const char* what) {
    const unsigned long g = gen;
    if (++arrived == live) {
      arrived = 0, ++gen;
      cv.notify_all();
      return;
    }
    t_wait(cv, lk, &gen, g, what);
  }
  void leave() {  // a thread returned: it counts as arrived from now on
    --live;
    if (arrived > 0 && arrived == live) arrived = 0, ++gen;
    cv.notify_all();
  }
};
struct TBlock {
  Rendezvous all;
  const char* site = "";
  int line = 0;
  std::vector<Rendezvous> warps;
  std::vector<std::array<unsigned char, 8>> xchg;
  explicit TBlock(int nt) : warps((nt + 31) / 32), xchg(nt) {}
};
inline thread_local TBlock* t_block = nullptr;
inline thread_local int t_me = 0;

inline void t_wait(std::condition_variable& cv, std::unique_lock<std::mutex>& lk,
                   unsigned long* gen_ptr, unsigned long g, const char* what) {
  if (!cv.wait_for(lk, std::chrono::seconds(120), [&] { return *gen_ptr != g; })) {
    std::fprintf(stderr, "dcemu: deadlock at %s in block (%u,%u,%u), thread %d\n", what,
                 blockIdx.x, blockIdx.y, blockIdx.z, t_me);
    std::abort();
  }
}

inline void t_block_barrier(const char* file, int line) {
  TBlock& b = *t_block;
  std::unique_lock<std::mutex> lk(b.all.mu);
  if (b.all.arrived == 0) {
    b.site = file, b.line = line;
  } else if (line != b.line || std::strcmp(file, b.site) != 0) {
    char buf[400];
    std::snprintf(buf, sizeof buf, "divergent __syncthreads in block (%u,%u,%u): %s:%d and %s:%d",
                  blockIdx.x, blockIdx.y, blockIdx.z, b.site, b.line, file, line);
    fail(cudaErrorLaunchFailure, buf);
  }
  b.all.arrive(lk, "__syncthreads");
}

inline void t_warp_barrier() {
  Rendezvous& w = t_block->warps[t_me >> 5];
  std::unique_lock<std::mutex> lk(w.mu);
  w.arrive(lk, "a warp shuffle");
}

// The whole grid on one pool of blockDim OS threads: every thread runs its part of block 0,
// then of block 1, ... (blocks in order, as in fiber mode); a block starts when every thread
// has returned from the previous one, so thread creation is paid once per launch.
inline void run_grid_threads(const dim3& grid, const dim3& bdim, const std::function<void()>& body) {
  const int nt = static_cast<int>(bdim.x * bdim.y * bdim.z);
  const int nw = (nt + 31) / 32;
  const unsigned long nblocks = 1ul * grid.x * grid.y * grid.z;
  TBlock b(nt);
  unsigned long started = 0;  // blocks started (under b.all.mu)
  int finished = 0;           // threads done with the current block
  auto reset = [&] {          // counters of a fresh block (under b.all.mu; every thread is idle)
    b.all.live = nt, b.all.arrived = 0;
    for (int w = 0; w < nw; ++w) {
      std::lock_guard<std::mutex> wl(b.warps[w].mu);
      b.warps[w].live = std::min(32, nt - 32 * w), b.warps[w].arrived = 0;
    }
    finished = 0;
  };
  reset();
  const dim3 bd = blockDim, gd = gridDim;
  unsigned char* smem = g_dyn_smem;
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (int i = 0; i < nt; ++i) {
    threads.emplace_back([&, i] {
      t_block = &b, t_me = i;
      threadIdx = dim3(i % bdim.x, (i / bdim.x) % bdim.y, i / (bdim.x * bdim.y));
      blockDim = bd, gridDim = gd, g_dyn_smem = smem;
      for (unsigned long k = 0; k < nblocks; ++k) {
        {
          std::unique_lock<std::mutex> lk(b.all.mu);
          b.all.cv.wait(lk, [&] { return started > k; });
        }
        blockIdx = dim3(static_cast<unsigned>(k % grid.x),
                        static_cast<unsigned>((k / grid.x) % grid.y),
                        static_cast<unsigned>(k / (1ul * grid.x * grid.y)));
        body();
        {
          Rendezvous& w = b.warps[i >> 5];
          std::lock_guard<std::mutex> wl(w.mu);
          w.leave();
        }
        std::lock_guard<std::mutex> lk(b.all.mu);
        b.all.leave();
        if (++finished == nt) {
          reset();
          ++started;
        }
        b.all.cv.notify_all();
      }
    });
  }
  {
    std::lock_guard<std::mutex> lk(b.all.mu);
    started = 1;
  }
  b.all.cv.notify_all();
  for (auto& t : threads) t.join();
}
#endif

// Stacks for n fibers, mapped once per OS thread (lazily backed: only touched pages use memory).
inline unsigned char* fiber_stacks(size_t n) {
  thread_local unsigned char* base = nullptr;
  thread_local size_t have = 0;
  if (n > have) {
    if (base) munmap(base, have * kStack);
    void* p = mmap(nullptr, n * kStack, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      base = nullptr, have = 0;
      return nullptr;
    }
    base = static_cast<unsigned char*>(p), have = n;
  }
  return base;
}

inline void run_grid(dim3 grid, dim3 block, size_t smem, const void* fn,
                     const std::function<void()>& body) {
  State& s = state();
  const unsigned long long nt = 1ull * block.x * block.y * block.z;
  if (nt == 0 || nt > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  if (smem > static_cast<size_t>(kDefaultSmem)) {
    auto it = s.max_dyn_smem.find(fn);
    const int allowed = it == s.max_dyn_smem.end() ? kDefaultSmem : it->second;
    if (smem > static_cast<size_t>(allowed) || smem > static_cast<size_t>(kOptinSmem)) {
      fail(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(smem) +
                                      " B above the kernel's limit " + std::to_string(allowed));
      return;
    }
  }
  std::vector<unsigned char> dyn(smem + 16, 0xCD);  // poisoned, like uninitialised smem
  unsigned char* saved_smem = g_dyn_smem;
  const dim3 saved_b = blockDim, saved_g = gridDim, saved_bi = blockIdx, saved_ti = threadIdx;
  g_dyn_smem = dyn.data();
  blockDim = block;
  gridDim = grid;
#ifdef DCEMU_THREADS
  run_grid_threads(grid, block, body);
#else
  if (unsigned char* stacks = fiber_stacks(static_cast<size_t>(nt))) {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          if (!run_block(block, body, stacks)) goto out;
        }
  } else {
    fail(cudaErrorLaunchFailure, "could not map the fiber stacks");
  }
out:
#endif
  g_dyn_smem = saved_smem;
  blockDim = saved_b, gridDim = saved_g, blockIdx = saved_bi, threadIdx = saved_ti;
}

template <class... P>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  void (*fn)(P...);
  template <class... A>
  void operator()(A&&... a) const {
    // arguments are copied as a real launch copies them, once, before any block runs
    auto args = std::make_tuple(static_cast<P>(a)...);
    const std::function<void()> body = [&] { std::apply(fn, args); };
    run_grid(grid, block, smem, reinterpret_cast<const void*>(fn), body);
  }
};

template <class... P>
Launcher<P...> launcher(dim3 grid, dim3 block, size_t smem, void (*fn)(P...)) {
  return Launcher<P...>{grid, block, smem, fn};
}

}  // namespace dcemu

#define DC_LAUNCH(kern, grid, block, smem, stream) ::dcemu::launcher(grid, block, smem, kern)
#define DC_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::dcemu::dynamic_smem())

#ifdef DCEMU_THREADS
#define __syncthreads() ::dcemu::t_block_barrier(__FILE__, __LINE__)
#else
#define __syncthreads() ::dcemu::park(::dcemu::kBlockBarrier, __FILE__, __LINE__)
#endif

template <class T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
#ifdef DCEMU_THREADS
  {
    dcemu::TBlock& b = *dcemu::t_block;
    const int me = dcemu::t_me, nt = static_cast<int>(b.xchg.size());
    std::memcpy(b.xchg[me].data(), &v, sizeof(T));
    dcemu::t_warp_barrier();
    const int lane = me & 31, base = me - lane, seg = lane & ~(width - 1);
    const int src = base + seg + ((lane ^ lane_mask) & (width - 1));
    T out = v;
    if (src < nt) std::memcpy(&out, b.xchg[src].data(), sizeof(T));
    dcemu::t_warp_barrier();
    return out;
  }
#endif
  dcemu::BlockRun* r = dcemu::g_run;
  const int me = r->cur, nt = static_cast<int>(r->fibers.size());
  std::memcpy(r->fibers[me].xchg, &v, sizeof(T));
  dcemu::park(dcemu::kWarpBarrier);
  const int lane = me & 31, base = me - lane;
  const int seg = lane & ~(width - 1);  // sub-warp segment of `width` lanes
  const int src = base + seg + ((lane ^ lane_mask) & (width - 1));
  T out = v;
  if (src < nt) std::memcpy(&out, r->fibers[src].xchg, sizeof(T));
  dcemu::park(dcemu::kWarpBarrier);  // every lane has read before any lane writes again
  return out;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Fibers never preempt each other between barriers, so plain read-modify-writes are atomic;
// thread mode uses real atomics.
template <class T>
inline T atomicAdd(T* p, T v) {
#ifdef DCEMU_THREADS
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  } else {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
      T want = old + v;
      if (__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        return old;
    }
  }
#else
  const T old = *p;
  *p = old + v;
  return old;
#endif
}

// CUDA's global min/max overloads
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

inline cudaError_t cudaGetLastError() {
  dcemu::State& s = dcemu::state();
  const cudaError_t e = s.last;
  s.last = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t) {
  thread_local std::string msg;
  msg = "emulated: " + dcemu::state().detail;
  return msg.c_str();
}
inline cudaError_t cudaGetDeviceCount(int* c) {
  *c = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = dcemu::state().device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  dcemu::state().device = d;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  if (dev != 0) return cudaErrorInvalidDevice;
  if (a != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = dcemu::kOptinSmem;
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* fn, cudaFuncAttribute a, int value) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > dcemu::kOptinSmem)
    return cudaErrorInvalidValue;
  dcemu::state().max_dyn_smem[reinterpret_cast<const void*>(fn)] = value;
  return cudaSuccess;
}
