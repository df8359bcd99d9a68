// Device time on the host's clock, for queue lag: how long after the host reached a boundary the
// GPU reached it. No ATen or CUDA here, so the GoogleTests exercise the rule directly.
//
// One reference event is synchronised once, at attach; from then on each resolved boundary event
// is placed on the host clock by chaining: its device time is the previous one's plus the
// elapsed time between the two events, which the phase's own timing already measured (no extra
// CUDA call in the usual case). Two facts keep the chain honest against rounding and the drift
// between the GPU's and the host's clocks: the GPU cannot reach an event before the host recorded
// it (device >= host record time), and it had reached it when a query saw it complete (device <=
// query time). Each placement is clamped into that window, and the clamped value is the next
// link's anchor.
#pragma once

#include <algorithm>

namespace stepscope::timing {

class DeviceClock {
 public:
  // The reference: the host clock when the GPU reached the anchor event (ns).
  void anchor(double host_ns) {
    anchor_ns_ = host_ns;
    valid_ = true;
  }
  bool valid() const { return valid_; }
  double anchor_ns() const { return anchor_ns_; }

  // An event the GPU reached `elapsed_ns` after the anchor, recorded by the host at `recorded_ns`
  // and seen complete at `seen_ns`. Returns its lag (ns, >= 0) and makes it the new anchor.
  double place(double elapsed_ns, double recorded_ns, double seen_ns) {
    double d = anchor_ns_ + elapsed_ns;
    d = std::min(std::max(d, recorded_ns), std::max(seen_ns, recorded_ns));
    anchor_ns_ = d;
    return d - recorded_ns;
  }

 private:
  double anchor_ns_ = 0;
  bool valid_ = false;
};

}  // namespace stepscope::timing
