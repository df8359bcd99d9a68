// NVTX ranges in the "stepscope" domain (NVTX v3, header-only).
//
// Cost: with no tool attached (no NVTX_INJECTION64_PATH, i.e. not under nsys/ncu) or with the
// switch off, every call is one relaxed atomic load and a branch (bench/nvtx_bench.py measures
// it). NVTX itself is initialised lazily by the first call in the process; a tool can only
// attach at that moment, so "no tool" is decided once and cached.
// Where the NVTX headers are absent (STEPSCOPE_WITH_NVTX undefined) everything compiles to
// empty functions, except capture_begin/capture_end's cudaProfilerStart/Stop.
//
// Threading: push/pop ranges nest per thread; start/end ranges may begin on one thread and
// end on another (backward runs on autograd's thread), so the Timeline uses start/end for
// steps, backward, loss and other, push/pop for the phases that begin and end on the training
// thread (forward, optimizer, modules, user phases).
//
// Strings: the phase names, and any name passed to push/start/mark, are registered strings
// (nvtxDomainRegisterStringA, cached, at most kMaxRegisteredStrings distinct names; past that
// they travel as plain ASCII). A name passed with Phase::kStep ("step 12") stays ASCII: the
// step number changes every step and registering each one would grow the tool's string table
// with the length of the run; the step number is also the range's int64 payload.
#pragma once

#include <cstddef>
#include <cstdint>

#include "phases.h"

namespace stepscope::nvtx {

// Phase (one fixed colour and named category each) comes from the one phase table.

inline constexpr const char* kDomainName = "stepscope";
inline constexpr size_t kMaxRegisteredStrings = 4096;

const char* phase_name(Phase p);
uint32_t phase_color(Phase p);     // ARGB, 0xFF alpha
uint32_t phase_category(Phase p);  // category id in the domain, named phase_name(p)

bool compiled_in();          // built with the NVTX headers
bool enabled();              // compiled in and not switched off
void set_enabled(bool on);   // process-wide switch; ranges already open still close
bool tool_attached();        // a tool took NVTX's callbacks (initialises NVTX if needed)

// name == nullptr: the phase's registered name. step >= 0 is attached as an int64 payload.
void push(Phase p, const char* name = nullptr, int64_t step = -1);
void pop();
uint64_t start(Phase p, const char* name = nullptr, int64_t step = -1);  // returns 0 when off
void end(uint64_t id);                                                  // end(0) is a no-op
void mark(const char* name, int64_t payload = -1);                      // Phase::kUser colour

// The same with an explicit ARGB colour (argb == 0: the phase's colour; no alpha byte, i.e.
// argb <= 0xFFFFFF, means opaque). payload < 0: none.
void push(Phase p, const char* name, int64_t payload, uint32_t argb);
uint64_t start(Phase p, const char* name, int64_t payload, uint32_t argb);
void mark(Phase p, const char* name, int64_t payload, uint32_t argb);

// Capture window (Monitor(profile_steps=range(a, b))): cudaProfilerStart/Stop where CUDA is
// compiled in and a CUDA context already exists (for `nsys profile --capture-range=cudaProfilerApi`;
// independent of the NVTX switch), plus one start/end range "capture" in the domain, inside
// the profiler window (for `--capture-range=nvtx --nvtx-capture=capture@stepscope`).
// A second capture_begin while a window is open, or capture_end with none open, is a no-op.
void capture_begin();
void capture_end();
bool capture_open();

// RAII push/pop range for C++ users:  { stepscope::nvtx::Range r("load batch"); ... }
// The name is only read during construction (registered, or copied by the tool).
class Range {
 public:
  explicit Range(const char* name, uint32_t argb = 0, Phase p = Phase::kUser) { push(p, name, -1, argb); }
  explicit Range(Phase p, const char* name = nullptr, int64_t payload = -1) { push(p, name, payload); }
  ~Range() { pop(); }
  Range(const Range&) = delete;
  Range& operator=(const Range&) = delete;
  Range(Range&&) = delete;
  Range& operator=(Range&&) = delete;
};

// Benchmark helper: runs n push/pop pairs of a registered phase range in a tight C++ loop and
// returns nanoseconds per pair (what one range costs, without any Python in the way).
double time_push_pop_ns(int64_t n);

}  // namespace stepscope::nvtx
