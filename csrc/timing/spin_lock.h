// The Timeline's lock. Every boundary takes it once, inside training hooks where the code around
// is cold: std::mutex goes through pthread_mutex_lock/unlock (two calls into libc, ~0.6 µs with
// cold caches), this is one atomic exchange and one store, inline. Contention is rare (autograd's
// thread and the training thread meet only at backward boundaries, and report() while training)
// and short, so a waiter spins on a plain load and yields its time slice meanwhile.
#pragma once

#include <atomic>
#include <thread>

namespace stepscope::timing {

class SpinLock {
 public:
  void lock() noexcept {
    while (held_.exchange(true, std::memory_order_acquire)) {
      while (held_.load(std::memory_order_relaxed)) std::this_thread::yield();
    }
  }
  void unlock() noexcept { held_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> held_{false};
};

}  // namespace stepscope::timing
