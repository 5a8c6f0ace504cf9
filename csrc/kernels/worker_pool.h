// One process-wide team of worker threads for the kernels' parallel loops. Plain C++: no torch headers.
//
// Why not OpenMP (at::parallel_for): libgomp gives every thread that opens a parallel region a team of its own,
// and once the teams' threads outnumber the cores (say the main thread's and a caller thread's, on two cores)
// it stops spinning between regions after ~1000 pauses and sleeps; every region then wakes its workers through
// the kernel, ~0.1 ms on a virtual machine, and a small model's decode step opens ~20 regions. This team
// serves every calling thread alike. Between jobs its workers spin for kSpin (the gaps between one forward's
// kernels, and between a loop's steps), then sleep until the next.
//
// A job is tasks 0 .. n - 1: the caller runs task 0, worker w runs task w + 1. The job's generation and task
// count are published together in one atomic word, so a worker that wakes late never mistakes one job for the
// next. A job opened from inside a task, or while another thread's job runs, runs its tasks in the caller.
#pragma once

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace specbeam {

class WorkerPool {
 public:
  // How long an idle worker spins before it sleeps.
  static constexpr std::chrono::microseconds kSpin{1000};

  // This process's team (a forked child makes its own: the parent's threads did not follow it).
  static WorkerPool& instance() {
    static std::atomic<WorkerPool*> pool{nullptr};
    static std::mutex creating;
    WorkerPool* current = pool.load(std::memory_order_acquire);
    if (current == nullptr || current->pid_ != getpid()) {
      std::lock_guard<std::mutex> lock(creating);
      current = pool.load(std::memory_order_acquire);
      if (current == nullptr || current->pid_ != getpid()) {
        current = new WorkerPool();  // never freed: its workers live as long as the process
        pool.store(current, std::memory_order_release);
      }
    }
    return *current;
  }

  // task(t) for t in [0, tasks), returning once all have run; a task's exception is rethrown here.
  void run(int tasks, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> lock(dispatch_, std::try_to_lock);
    if (tasks <= 1 || in_task() || !lock.owns_lock()) {
      for (int t = 0; t < tasks; ++t) task(t);
      return;
    }
    grow(tasks - 1);
    task_ = &task;
    error_ = nullptr;
    remaining_.store(tasks - 1, std::memory_order_relaxed);
    job_.store(((job_.load(std::memory_order_relaxed) >> kTaskBits) + 1) << kTaskBits | uint64_t(tasks));
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> guard(sleep_);
      wake_.notify_all();
    }
    run_task(0);
    while (remaining_.load(std::memory_order_acquire) > 0) relax();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr int kTaskBits = 16;  // the job word: generation << kTaskBits | task count

  WorkerPool() : pid_(getpid()) {}

  static bool& in_task() {
    thread_local bool inside = false;
    return inside;
  }

  static void relax() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  void grow(int workers) {  // worker w runs task w + 1; it starts from the job word before the job it is made for
    for (; workers_ < workers; ++workers_) {
      std::thread([this, t = workers_ + 1, seen = job_.load()] { work(t, seen); }).detach();
    }
  }

  void run_task(int t) {
    in_task() = true;
    try {
      (*task_)(t);
    } catch (...) {
      std::lock_guard<std::mutex> guard(sleep_);
      if (!error_) error_ = std::current_exception();
    }
    in_task() = false;
  }

  void work(int t, uint64_t seen) {
    for (;;) {
      seen = next_job(seen);
      if (t < int(seen & ((uint64_t(1) << kTaskBits) - 1))) {
        run_task(t);
        remaining_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  uint64_t next_job(uint64_t seen) {  // spin for kSpin, then sleep
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int spins = 0;; ++spins) {
      const uint64_t job = job_.load(std::memory_order_acquire);
      if (job != seen) return job;
      if ((spins & 255) == 255 && std::chrono::steady_clock::now() > until) break;
      relax();
    }
    std::unique_lock<std::mutex> lock(sleep_);
    sleepers_.fetch_add(1);  // seq_cst against the dispatcher's store of job_ then load of sleepers_
    wake_.wait(lock, [&] { return job_.load() != seen; });
    sleepers_.fetch_sub(1);
    return job_.load(std::memory_order_acquire);
  }

  const pid_t pid_;
  std::mutex dispatch_;  // one job at a time
  int workers_ = 0;
  std::atomic<uint64_t> job_{0};
  std::atomic<int> remaining_{0};  // workers still running the current job's tasks
  std::atomic<int> sleepers_{0};
  const std::function<void(int)>* task_ = nullptr;
  std::exception_ptr error_;
  std::mutex sleep_;
  std::condition_variable wake_;
};

}  // namespace specbeam
