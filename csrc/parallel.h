// The kernels' parallel loop, at::parallel_for's split (contiguous ranges of at least `grain`, one per thread, as
// many threads as torch.set_num_threads allows), run where its team is hot. On the process's main thread, which
// loaded the model and whose OpenMP team torch's own operations keep spinning: at::parallel_for. On any other
// thread (one of several `generate` callers taking its turn): specbeam's worker team (kernels/worker_pool.h),
// because a second OpenMP team makes libgomp stop spinning and wake its workers through the kernel for every
// region, while the main thread's team, idle, would fight a spinning pool of ours there.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels/worker_pool.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace specbeam {

inline bool on_main_thread() {  // (asked once per thread: a system call)
#if defined(__linux__)
  thread_local const bool main = syscall(SYS_gettid) == getpid();
  return main;
#else
  return true;
#endif
}

// torch's thread count as this thread saw it before `serial_torch_ops` (0: it has not been called here)
inline int& remembered_threads() {
  thread_local int threads = 0;
  return threads;
}

// serial: torch's own operations on the calling thread run on it alone, while the kernels' loops keep torch's
// thread count on specbeam's worker team: torch's operations would otherwise open a second OpenMP team beside
// the main thread's (the same trouble as above, for every torch operation big enough to go parallel). Not
// serial: the thread's count as it was. On the main thread, whose team is the one: nothing. OpenMP's count is
// the calling thread's own: no other thread changes.
inline void serial_torch_ops(bool serial) {
#ifdef _OPENMP
  if (on_main_thread()) return;
  if (serial && remembered_threads() == 0) {
    remembered_threads() = int(at::get_num_threads());
    omp_set_num_threads(1);
  } else if (!serial && remembered_threads() > 0) {
    omp_set_num_threads(remembered_threads());
    remembered_threads() = 0;
  }
#endif
}

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {  // body(begin, end)
  if (on_main_thread()) return at::parallel_for(begin, end, grain, body);
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t threads = remembered_threads() > 0 ? remembered_threads() : at::get_num_threads();
  const int64_t tasks = std::min<int64_t>(threads, (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (tasks <= 1) return body(begin, end);
  const int64_t chunk = (n + tasks - 1) / tasks;
  WorkerPool::instance().run(int(tasks), [&](int t) {
    const int64_t first = begin + t * chunk;
    if (first < end) body(first, std::min(end, first + chunk));
  });
}

}  // namespace specbeam
