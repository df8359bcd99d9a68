#include "nvtx/nvtx.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(STEPSCOPE_WITH_NVTX)
#include <nvtx3/nvToolsExt.h>
#endif

#if defined(STEPSCOPE_WITH_CUDA)
#include <ATen/detail/CUDAHooksInterface.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>
#endif

namespace stepscope::nvtx {
namespace {

constexpr int kPhases = static_cast<int>(Phase::kCount);
int index_of(Phase p) {
  const int i = static_cast<int>(p);
  return (i >= 0 && i < kPhases) ? i : static_cast<int>(Phase::kUser);
}

const PhaseInfo& info(Phase p) { return kPhaseTable[index_of(p)]; }

// The user's switch (set_enabled), read when the state below is (re)computed.
std::atomic<bool> g_switch{true};

#if defined(STEPSCOPE_WITH_NVTX)
// The one word every call reads. kNoTool is final: NVTX decides at its first call whether a
// tool is attached and never looks again, so with no tool each call costs this load and a
// branch. kToolOff still tracks pushes so that ranges opened while on close after a switch.
enum State : int { kUninit = -1, kNoTool = 0, kToolOff = 1, kToolOn = 2 };
std::atomic<int> g_state{kUninit};
std::mutex g_init_mutex;  // guards initialisation and switch changes (both rare)

struct Domain {
  nvtxDomainHandle_t handle = nullptr;
  nvtxStringHandle_t names[kPhases] = {};
};
Domain g_domain;  // written once under g_init_mutex before g_state leaves kUninit

// Registered strings for names other than the phases' own (user ranges, module names).
std::mutex g_strings_mutex;
std::unordered_map<std::string, nvtxStringHandle_t>* g_strings = nullptr;  // leaked: used at exit

// Per-thread record of which pushes reached the tool, so pop() pops exactly those even if the
// switch changed in between (a pop for a push that was skipped must be skipped too).
thread_local std::vector<bool> t_pushed;

int initialize() {
  std::lock_guard<std::mutex> lock(g_init_mutex);
  int s = g_state.load(std::memory_order_acquire);
  if (s != kUninit) return s;
  // The first NVTX call loads the injection library named by NVTX_INJECTION64_PATH, if any;
  // with none, every NVTX entry point becomes a no-op and DomainCreate returns null.
  g_domain.handle = nvtxDomainCreateA(kDomainName);
  if (g_domain.handle == nullptr) {
    s = kNoTool;
  } else {
    for (int i = 0; i < kPhases; ++i) {
      g_domain.names[i] = nvtxDomainRegisterStringA(g_domain.handle, kPhaseTable[i].nvtx_name);
      nvtxDomainNameCategoryA(g_domain.handle, kPhaseTable[i].category, kPhaseTable[i].nvtx_name);
    }
    s = g_switch.load() ? kToolOn : kToolOff;
  }
  g_state.store(s, std::memory_order_release);
  return s;
}

// Slow path of every entry point: only taken with a tool attached (or before the first call).
inline int state() {
  const int s = g_state.load(std::memory_order_acquire);
  return s == kUninit ? initialize() : s;
}

nvtxStringHandle_t registered(const char* name) {
  std::lock_guard<std::mutex> lock(g_strings_mutex);
  if (g_strings == nullptr) g_strings = new std::unordered_map<std::string, nvtxStringHandle_t>();
  auto it = g_strings->find(name);
  if (it != g_strings->end()) return it->second;
  if (g_strings->size() >= kMaxRegisteredStrings) return nullptr;
  nvtxStringHandle_t h = nvtxDomainRegisterStringA(g_domain.handle, name);
  g_strings->emplace(name, h);
  return h;
}

nvtxEventAttributes_t attributes(Phase p, const char* name, int64_t payload, uint32_t argb) {
  nvtxEventAttributes_t a;
  std::memset(&a, 0, sizeof(a));
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  const int i = index_of(p);
  a.category = kPhaseTable[i].category;
  a.colorType = NVTX_COLOR_ARGB;
  a.color = argb == 0 ? kPhaseTable[i].argb : (argb <= 0xFFFFFFu ? (argb | 0xFF000000u) : argb);
  nvtxStringHandle_t h = nullptr;
  if (name == nullptr) {
    h = g_domain.names[i];
  } else if (p != Phase::kStep) {
    h = registered(name);
  }
  if (h != nullptr) {
    a.messageType = NVTX_MESSAGE_TYPE_REGISTERED;
    a.message.registered = h;
  } else {
    a.messageType = NVTX_MESSAGE_TYPE_ASCII;
    a.message.ascii = name != nullptr ? name : kPhaseTable[i].nvtx_name;
  }
  if (payload >= 0) {
    a.payloadType = NVTX_PAYLOAD_TYPE_INT64;
    a.payload.llValue = payload;
  }
  return a;
}
#endif  // STEPSCOPE_WITH_NVTX

}  // namespace

const char* phase_name(Phase p) { return info(p).nvtx_name; }
uint32_t phase_color(Phase p) { return info(p).argb; }
uint32_t phase_category(Phase p) { return info(p).category; }

bool compiled_in() {
#if defined(STEPSCOPE_WITH_NVTX)
  return true;
#else
  return false;
#endif
}

bool enabled() { return compiled_in() && g_switch.load(std::memory_order_relaxed); }

void set_enabled(bool on) {
#if defined(STEPSCOPE_WITH_NVTX)
  std::lock_guard<std::mutex> lock(g_init_mutex);
  g_switch.store(on);
  const int s = g_state.load(std::memory_order_acquire);
  if (s == kToolOn || s == kToolOff) g_state.store(on ? kToolOn : kToolOff, std::memory_order_release);
#else
  g_switch.store(on);
#endif
}

bool tool_attached() {
#if defined(STEPSCOPE_WITH_NVTX)
  return state() != kNoTool;
#else
  return false;
#endif
}

void push(Phase p, const char* name, int64_t payload, uint32_t argb) {
#if defined(STEPSCOPE_WITH_NVTX)
  if (g_state.load(std::memory_order_relaxed) == kNoTool) return;
  const int s = state();
  if (s == kNoTool) return;
  const bool emit = s == kToolOn;
  t_pushed.push_back(emit);
  if (!emit) return;
  const nvtxEventAttributes_t a = attributes(p, name, payload, argb);
  nvtxDomainRangePushEx(g_domain.handle, &a);
#endif
}

void push(Phase p, const char* name, int64_t step) { push(p, name, step, 0u); }

void pop() {
#if defined(STEPSCOPE_WITH_NVTX)
  if (g_state.load(std::memory_order_relaxed) == kNoTool) return;
  // An unmatched pop (nothing pushed on this thread) must not pop a tool range we did not open.
  if (t_pushed.empty()) return;
  const bool emitted = t_pushed.back();
  t_pushed.pop_back();
  if (emitted) nvtxDomainRangePop(g_domain.handle);
#endif
}

uint64_t start(Phase p, const char* name, int64_t payload, uint32_t argb) {
#if defined(STEPSCOPE_WITH_NVTX)
  if (g_state.load(std::memory_order_relaxed) == kNoTool) return 0;
  if (state() != kToolOn) return 0;
  const nvtxEventAttributes_t a = attributes(p, name, payload, argb);
  return nvtxDomainRangeStartEx(g_domain.handle, &a);
#else
  return 0;
#endif
}

uint64_t start(Phase p, const char* name, int64_t step) { return start(p, name, step, 0u); }

void end(uint64_t id) {
#if defined(STEPSCOPE_WITH_NVTX)
  // A nonzero id came from a tool, so NVTX is initialised; it is ended even if the switch went
  // off meanwhile, so no range stays open.
  if (id == 0) return;
  nvtxDomainRangeEnd(g_domain.handle, id);
#else
  (void)id;
#endif
}

void mark(Phase p, const char* name, int64_t payload, uint32_t argb) {
#if defined(STEPSCOPE_WITH_NVTX)
  if (g_state.load(std::memory_order_relaxed) == kNoTool) return;
  if (state() != kToolOn) return;
  const nvtxEventAttributes_t a = attributes(p, name, payload, argb);
  nvtxDomainMarkEx(g_domain.handle, &a);
#endif
}

void mark(const char* name, int64_t payload) { mark(Phase::kUser, name, payload, 0u); }

// ---------------------------------------------------------------- capture window
namespace {
std::mutex g_capture_mutex;
bool g_capture_open = false;
uint64_t g_capture_id = 0;
#if defined(STEPSCOPE_WITH_CUDA)
bool g_profiler_started = false;

// cudaProfilerStart would create a CUDA context on a process that has none (hundreds of MB of
// device memory for a CPU-only run); only a process already using CUDA gets the window.
bool cuda_context_exists() {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  try {
    return at::detail::getCUDAHooks().hasPrimaryContext(static_cast<c10::DeviceIndex>(dev));
  } catch (...) {
    return false;
  }
}
#endif
}  // namespace

void capture_begin() {
  std::lock_guard<std::mutex> lock(g_capture_mutex);
  if (g_capture_open) return;
  g_capture_open = true;
#if defined(STEPSCOPE_WITH_CUDA)
  g_profiler_started = cuda_context_exists() && cudaProfilerStart() == cudaSuccess;
  // A failed call must not leave its error for the next kernel launch check to report.
  if (!g_profiler_started) (void)cudaGetLastError();
#endif
  g_capture_id = start(Phase::kCapture);
}

void capture_end() {
  std::lock_guard<std::mutex> lock(g_capture_mutex);
  if (!g_capture_open) return;
  g_capture_open = false;
  end(g_capture_id);
  g_capture_id = 0;
#if defined(STEPSCOPE_WITH_CUDA)
  if (g_profiler_started && cudaProfilerStop() != cudaSuccess) (void)cudaGetLastError();
  g_profiler_started = false;
#endif
}

bool capture_open() {
  std::lock_guard<std::mutex> lock(g_capture_mutex);
  return g_capture_open;
}

double time_push_pop_ns(int64_t n) {
  if (n <= 0) return 0.0;
  // Called through volatile pointers so the compiler cannot inline them into the loop: the
  // figure is what a caller in another library (the Timeline, a user's program) pays.
  void (*volatile push_fn)(Phase, const char*, int64_t) = &push;
  void (*volatile pop_fn)() = &pop;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; ++i) {
    push_fn(Phase::kUser, nullptr, -1);
    pop_fn();
  }
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(n);
}

}  // namespace stepscope::nvtx
