#include "timing/event_pool.h"

#include <c10/util/Exception.h>

#if defined(STEPSCOPE_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace stepscope::timing {

EventPool::EventPool(int capacity) : capacity_(capacity > 0 ? capacity : 1), unmade_(capacity_) {
  events_.assign(capacity_, nullptr);
  refs_.assign(capacity_, 0);
  stamps_.assign(capacity_, 0);
  free_.reserve(capacity_);
}

EventPool::~EventPool() {
#if defined(STEPSCOPE_WITH_CUDA)
  for (void* e : events_)
    if (e != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(e));  // never throw from a destructor
#endif
}

bool EventPool::available() {
#if defined(STEPSCOPE_WITH_CUDA)
  return c10::cuda::device_count() > 0;
#else
  return false;
#endif
}

int EventPool::record() {
#if defined(STEPSCOPE_WITH_CUDA)
  const int dev = c10::cuda::current_device();
  if (device_ < 0) device_ = dev;
  if (dev != device_) return -1;  // one pool times one device; events of another cannot be paired
  const int slot = take();
  if (slot < 0) return -1;
  // A failed create or record gives the slot back before it throws: no EventRef owns it yet, so
  // it would otherwise be lost to the pool for good (a slot whose event is still null is created
  // at its next record()).
  if (events_[slot] == nullptr) {
    cudaEvent_t e = nullptr;
    // cudaEventDefault, not DisableTiming: timing is the point. No BlockingSync either, and no
    // one ever waits on these events anyway.
    const cudaError_t made = cudaEventCreateWithFlags(&e, cudaEventDefault);
    if (made != cudaSuccess) unref(slot);
    C10_CUDA_CHECK(made);
    events_[slot] = e;
  }
  const cudaError_t put =
      cudaEventRecord(static_cast<cudaEvent_t>(events_[slot]), c10::cuda::getCurrentCUDAStream(dev).stream());
  if (put != cudaSuccess) unref(slot);
  C10_CUDA_CHECK(put);
  return slot;
#else
  return -1;
#endif
}

int EventPool::take() {
  // Slot bookkeeping only: the slot's event is created by its first record(), so that take()
  // touches no CUDA.
  int slot;
  if (!free_.empty()) {
    slot = free_.back();
    free_.pop_back();
  } else if (unmade_ > 0) {
    slot = capacity_ - unmade_;
    --unmade_;
  } else {
    return -1;
  }
  refs_[slot] = 1;
  return slot;
}

void EventPool::unref(int slot) {
  if (slot < 0) return;
  if (--refs_[slot] == 0) free_.push_back(slot);
}

int EventPool::query(int slot) const {
#if defined(STEPSCOPE_WITH_CUDA)
  if (events_[slot] == nullptr) return -1;  // a slot taken but never recorded: nothing to ask CUDA
  const cudaError_t r = cudaEventQuery(static_cast<cudaEvent_t>(events_[slot]));
  if (r == cudaSuccess) return 1;
  if (r == cudaErrorNotReady) {
    (void)cudaGetLastError();  // NotReady is not an error; do not leave it for the next launch check
    return 0;
  }
  // Any other code is a real (possibly earlier, asynchronous) error: leave it for torch's next
  // check to report, and drop this sample.
  return -1;
#else
  return -1;
#endif
}

float EventPool::elapsed_ms(int a, int b) const {
  float ms = 0.f;
#if defined(STEPSCOPE_WITH_CUDA)
  if (events_[a] == nullptr || events_[b] == nullptr) return -1.f;
  if (cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(events_[a]), static_cast<cudaEvent_t>(events_[b])) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return -1.f;
  }
#endif
  return ms;
}

bool read_device_memory(int device, DeviceMemory* out) {
#if defined(STEPSCOPE_WITH_CUDA)
  if (device < 0) return false;
  // Index 0 of each StatArray is the aggregate over pool kinds (StatType::AGGREGATE).
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  out->allocated = s.allocated_bytes[0].current;
  out->peak_allocated = s.allocated_bytes[0].peak;
  out->reserved = s.reserved_bytes[0].current;
  out->peak_reserved = s.reserved_bytes[0].peak;
  return true;
#else
  (void)device;
  (void)out;
  return false;
#endif
}

bool EventPool::synchronize(int slot) const {
#if defined(STEPSCOPE_WITH_CUDA)
  if (events_[slot] == nullptr) return false;
  if (cudaEventSynchronize(static_cast<cudaEvent_t>(events_[slot])) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
#else
  (void)slot;
  return false;
#endif
}

}  // namespace stepscope::timing
