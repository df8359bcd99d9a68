#include "nvtx/nvtx.h"

#include <atomic>
#include <cstring>

#if defined(STEPSCOPE_WITH_NVTX)
#include <nvtx3/nvToolsExt.h>
#endif

namespace stepscope::nvtx {
namespace {

std::atomic<bool> g_enabled{true};

constexpr const char* kNames[] = {"step",  "data", "forward", "loss",   "backward", "other",
                                  "optimizer", "eval", "user", "module", "capture"};
static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<size_t>(Phase::kCount));

#if defined(STEPSCOPE_WITH_NVTX)
// ARGB colours, one per phase (fixed so a trace reads the same every run).
constexpr uint32_t kColors[] = {0xFF5B5B5B, 0xFFB0B0B0, 0xFF1F77B4, 0xFFFF7F0E, 0xFFD62728, 0xFF9467BD,
                                0xFF2CA02C, 0xFF17BECF, 0xFFBCBD22, 0xFF8C564B, 0xFFE377C2};

struct Domain {
  nvtxDomainHandle_t handle;
  nvtxStringHandle_t names[static_cast<int>(Phase::kCount)];
  Domain() {
    handle = nvtxDomainCreateA("stepscope");
    for (int i = 0; i < static_cast<int>(Phase::kCount); ++i) {
      names[i] = nvtxDomainRegisterStringA(handle, kNames[i]);
      nvtxDomainNameCategoryA(handle, static_cast<uint32_t>(i + 1), kNames[i]);
    }
  }
};

Domain& domain() {
  static Domain d;  // created on first use: a tool attached later still sees it registered
  return d;
}

nvtxEventAttributes_t attributes(Phase p, const char* name, int64_t step) {
  nvtxEventAttributes_t a;
  std::memset(&a, 0, sizeof(a));
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  const int i = static_cast<int>(p);
  a.category = static_cast<uint32_t>(i + 1);
  a.colorType = NVTX_COLOR_ARGB;
  a.color = kColors[i];
  if (name != nullptr) {
    a.messageType = NVTX_MESSAGE_TYPE_ASCII;
    a.message.ascii = name;
  } else {
    a.messageType = NVTX_MESSAGE_TYPE_REGISTERED;
    a.message.registered = domain().names[i];
  }
  if (step >= 0) {
    a.payloadType = NVTX_PAYLOAD_TYPE_INT64;
    a.payload.llValue = step;
  }
  return a;
}
#endif

}  // namespace

const char* phase_name(Phase p) { return kNames[static_cast<int>(p)]; }

bool compiled_in() {
#if defined(STEPSCOPE_WITH_NVTX)
  return true;
#else
  return false;
#endif
}

bool enabled() { return compiled_in() && g_enabled.load(std::memory_order_relaxed); }
void set_enabled(bool on) { g_enabled.store(on, std::memory_order_relaxed); }

void push(Phase p, const char* name, int64_t step) {
#if defined(STEPSCOPE_WITH_NVTX)
  if (!g_enabled.load(std::memory_order_relaxed)) return;
  const nvtxEventAttributes_t a = attributes(p, name, step);
  nvtxDomainRangePushEx(domain().handle, &a);
#endif
}

void pop() {
#if defined(STEPSCOPE_WITH_NVTX)
  if (!g_enabled.load(std::memory_order_relaxed)) return;
  nvtxDomainRangePop(domain().handle);
#endif
}

uint64_t start(Phase p, const char* name, int64_t step) {
#if defined(STEPSCOPE_WITH_NVTX)
  if (!g_enabled.load(std::memory_order_relaxed)) return 0;
  const nvtxEventAttributes_t a = attributes(p, name, step);
  return nvtxDomainRangeStartEx(domain().handle, &a);
#else
  return 0;
#endif
}

void end(uint64_t id) {
#if defined(STEPSCOPE_WITH_NVTX)
  if (id == 0) return;
  nvtxDomainRangeEnd(domain().handle, id);
#endif
}

void mark(const char* name, int64_t payload) {
#if defined(STEPSCOPE_WITH_NVTX)
  if (!g_enabled.load(std::memory_order_relaxed)) return;
  const nvtxEventAttributes_t a = attributes(Phase::kUser, name, payload);
  nvtxDomainMarkEx(domain().handle, &a);
#endif
}

namespace {
std::atomic<uint64_t> g_capture{0};
}

void capture_begin() {
  // TODO(nvtx issue): cudaProfilerStart() when CUDA is compiled in.
  g_capture.store(start(Phase::kCapture));
}

void capture_end() { end(g_capture.exchange(0)); }

}  // namespace stepscope::nvtx
