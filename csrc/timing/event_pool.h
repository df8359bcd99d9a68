// A bounded pool of CUDA timing events. Events are recorded on the current stream of the calling
// thread and read back only with cudaEventQuery once complete: nothing here ever waits on the
// device. When the GPU runs so far behind that every event is still in flight, record() returns
// -1 and the caller counts a dropped sample instead of stalling.
//
// Not thread-safe: the Timeline serialises all calls under its mutex. Without CUDA compiled in
// (or with no device at run time) the pool is empty and record() always returns -1.
//
// A slot lives while references to it are held; EventRef is the one way the Timeline holds one
// (move-only, released on destruction or reset()), so no code path counts references by hand.
#pragma once

#include <cstdint>
#include <vector>

namespace stepscope::timing {

// The CUDA caching allocator's counters for one device (bytes), read on the host: the allocator's
// own bookkeeping, no device synchronisation. What torch.cuda.memory_stats() reports, without
// building its Python dict.
struct DeviceMemory {
  int64_t allocated = -1, peak_allocated = -1, reserved = -1, peak_reserved = -1;
};
// False (and `out` untouched) without CUDA or for a device < 0.
bool read_device_memory(int device, DeviceMemory* out);

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
  // A free slot with one reference and nothing recorded on it (record() is take() and a record);
  // -1 when none is free. It makes no CUDA call (a slot's event is created at its first record),
  // so the GoogleTests count references on the CPU, in a CUDA build too.
  int take();
  void ref(int slot) { ++refs_[slot]; }
  void unref(int slot);  // frees the slot at zero references
  int refs(int slot) const { return refs_[slot]; }
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
  int device() const { return device_; }  // the device of the first recorded event; -1 before
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

// One reference to a pool slot: move-only; released when destroyed, reset() or assigned over.
// share() takes another reference to the same event. An empty ref (slot -1) stands for a
// boundary with no event (not device-timed, or the pool ran dry). The pool must outlive it.
class EventRef {
 public:
  EventRef() = default;
  // Takes over the one reference that record() / take() gave `slot` (< 0: an empty ref).
  static EventRef adopt(EventPool* pool, int slot) { return slot < 0 ? EventRef() : EventRef(pool, slot); }
  EventRef(EventRef&& o) noexcept : pool_(o.pool_), slot_(o.slot_) { o.slot_ = -1; }
  EventRef& operator=(EventRef&& o) noexcept {
    if (this != &o) {
      reset();
      pool_ = o.pool_;
      slot_ = o.slot_;
      o.slot_ = -1;
    }
    return *this;
  }
  EventRef(const EventRef&) = delete;
  EventRef& operator=(const EventRef&) = delete;
  ~EventRef() { reset(); }

  EventRef share() const {
    if (slot_ < 0) return EventRef();
    pool_->ref(slot_);
    return EventRef(pool_, slot_);
  }
  void reset() {
    if (slot_ >= 0) pool_->unref(slot_);
    slot_ = -1;
  }
  int slot() const { return slot_; }
  explicit operator bool() const { return slot_ >= 0; }

 private:
  EventRef(EventPool* pool, int slot) : pool_(pool), slot_(slot) {}
  EventPool* pool_ = nullptr;
  int slot_ = -1;
};

}  // namespace stepscope::timing
