// A fixed-capacity ring: the last `capacity` items pushed, oldest first. Memory is allocated
// once, so a run of any length keeps the same footprint.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace stepscope::timing {

template <typename T>
class Ring {
 public:
  explicit Ring(size_t capacity) : items_(capacity > 0 ? capacity : 1) {}

  T& push() {  // the slot to fill (overwrites the oldest when full)
    T& slot = items_[head_];
    head_ = (head_ + 1) % items_.size();
    ++pushed_;
    return slot;
  }
  void clear() {  // forgets every item; keeps the memory
    head_ = 0;
    pushed_ = 0;
  }
  size_t capacity() const { return items_.size(); }
  size_t size() const { return pushed_ < items_.size() ? static_cast<size_t>(pushed_) : items_.size(); }
  uint64_t pushed() const { return pushed_; }
  // i = 0 is the oldest kept item.
  const T& operator[](size_t i) const {
    const size_t first = pushed_ < items_.size() ? 0 : head_;
    return items_[(first + i) % items_.size()];
  }
  T& operator[](size_t i) { return const_cast<T&>(static_cast<const Ring&>(*this)[i]); }

 private:
  std::vector<T> items_;
  size_t head_ = 0;
  uint64_t pushed_ = 0;
};

}  // namespace stepscope::timing
