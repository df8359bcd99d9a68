// A bounded pool of CUDA timing events. Events are recorded on the current stream of the calling
// thread and read back only with cudaEventQuery once complete: nothing here ever waits on the
// device. When the GPU runs so far behind that every event is still in flight, record() returns
// -1 and the caller counts a dropped sample instead of stalling.
//
// Not thread-safe: the Timeline serialises all calls under its mutex. Without CUDA compiled in
// (or with no device at run time) the pool is empty and record() always returns -1.
#pragma once

#include <cstdint>
#include <vector>

namespace stepscope::timing {

class EventPool {
 public:
  explicit EventPool(int capacity);
  ~EventPool();
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;

  static bool available();  // CUDA compiled in and a device present
  // Records a free event on the current stream of the current device; the slot starts with one
  // reference. -1 when no slot is free or the device differs from the pool's.
  int record();
  void ref(int slot) { ++refs_[slot]; }
  void unref(int slot);  // frees the slot at zero references
  // 1 complete, 0 still in flight, -1 failed (the sample is dropped).
  int query(int slot) const;
  // Milliseconds between two complete events.
  float elapsed_ms(int a, int b) const;
  // The host clock (ns) at which the caller recorded the slot's event (queue lag).
  void stamp(int slot, int64_t host_ns) { stamps_[slot] = host_ns; }
  int64_t stamp(int slot) const { return stamps_[slot]; }
  // Blocks until the slot's event completed: only for the one reference event at attach.
  bool synchronize(int slot) const;
  int capacity() const { return capacity_; }
  int in_use() const { return capacity_ - static_cast<int>(free_.size()) - unmade_; }

 private:
  int capacity_;
  int unmade_;  // events are created on first need, so an idle pool costs nothing
  int device_ = -1;
  std::vector<void*> events_;  // cudaEvent_t, kept opaque so this header needs no CUDA
  std::vector<int> refs_;
  std::vector<int64_t> stamps_;
  std::vector<int> free_;
};

}  // namespace stepscope::timing
