// Thread-count resolution and a static-partition parallel loop.
//
// threads = 0 means DIFFCAM_NUM_THREADS when set, else std::thread::hardware_concurrency().
// parallel_for splits [0, n) into `t` contiguous chunks, one std::thread each (the calling thread
// runs the first chunk).  The partition only decides who computes which independent item; every
// item is computed by exactly one thread in a fixed order, so results never depend on t.
// Thread start-up costs ~20-50 us, so callers pass t = 1 for small amounts of work.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

namespace diffcam {

inline int resolve_threads(int threads) {
  if (threads > 0) return threads;
  if (const char* s = std::getenv("DIFFCAM_NUM_THREADS")) {
    int v = std::atoi(s);
    if (v > 0) return v;
  }
  // hardware_concurrency() reads /sys on every call (~10 us): ask once.
  static const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

// fn(begin, end, chunk_index) for each chunk.
template <class F>
void parallel_for(long n, int t, F&& fn) {
  if (n <= 0) return;
  t = static_cast<int>(std::max<long>(1, std::min<long>(t, n)));
  if (t == 1) {
    fn(0L, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errs(t);
  pool.reserve(t - 1);
  auto bounds = [&](int i) { return n * i / t; };
  for (int i = 1; i < t; ++i) {
    pool.emplace_back([&, i] {
      try {
        fn(bounds(i), bounds(i + 1), i);
      } catch (...) {
        errs[i] = std::current_exception();
      }
    });
  }
  try {
    fn(bounds(0), bounds(1), 0);
  } catch (...) {
    errs[0] = std::current_exception();
  }
  for (auto& th : pool) th.join();
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}

// Dynamic variant: t workers (the calling thread is worker 0) take blocks of `grain` items
// [b, e) in increasing order from a shared counter until none is left, so a core slowed by other
// work does less; fn(b, e, worker) may be called several times per worker.  As with
// parallel_for, each item is computed by exactly one thread, so results never depend on t.
template <class F>
void parallel_for_dynamic(long n, int t, long grain, F&& fn) {
  if (n <= 0) return;
  grain = std::max<long>(1, grain);
  t = static_cast<int>(std::max<long>(1, std::min<long>(t, (n + grain - 1) / grain)));
  if (t == 1) {
    fn(0L, n, 0);
    return;
  }
  std::atomic<long> next{0};
  parallel_for(static_cast<long>(t), t, [&](long w, long, int) {
    for (;;) {
      const long b = next.fetch_add(grain, std::memory_order_relaxed);
      if (b >= n) break;
      fn(b, std::min(n, b + grain), static_cast<int>(w));
    }
  });
}

}  // namespace diffcam
