// NVTX ranges in the "stepscope" domain (NVTX v3, header-only). Every function is a cheap
// no-op when NVTX is compiled out, disabled, or no tool is attached.
//
// Threading: push/pop ranges nest per thread; start/end ranges may begin on one thread and
// end on another (backward runs on autograd's thread), so the Timeline uses start/end for
// steps and backward, push/pop for the phases that begin and end on the training thread.
#pragma once

#include <cstdint>

namespace stepscope::nvtx {

// One fixed colour and named category per phase.
enum class Phase : int {
  kStep = 0,
  kData,
  kForward,
  kLoss,
  kBackward,
  kOther,
  kOptimizer,
  kEval,
  kUser,
  kModule,
  kCapture,
  kCount
};

const char* phase_name(Phase p);

bool compiled_in();           // built with the NVTX headers
bool enabled();               // compiled in and not switched off
void set_enabled(bool on);    // process-wide switch (Monitor(nvtx=False) turns it off)

// name == nullptr: the phase's registered name. step >= 0 is attached as an int64 payload.
void push(Phase p, const char* name = nullptr, int64_t step = -1);
void pop();
uint64_t start(Phase p, const char* name = nullptr, int64_t step = -1);  // returns 0 when off
void end(uint64_t id);
void mark(const char* name, int64_t payload = -1);

// Capture window (Monitor(profile_steps=range(a, b))): cudaProfilerStart/Stop where CUDA is
// compiled in, plus one start/end range named "capture" in the domain, for
// `nsys profile --capture-range=cudaProfilerApi` or `--capture-range=nvtx`.
void capture_begin();
void capture_end();

}  // namespace stepscope::nvtx
