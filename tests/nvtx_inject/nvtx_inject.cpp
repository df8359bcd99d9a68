// A minimal NVTX tool for the tests: NVTX loads it through NVTX_INJECTION64_PATH and hands it
// the CORE2 (domain) callbacks. Every call is written as one line to the file named by
// STEPSCOPE_NVTX_LOG (or counted only, when the variable is unset: the benchmark's "tool
// attached, nothing recorded" case).
//
// Line format: the callback name, then tab-separated key=value fields, e.g.
//   DomainRangePushEx	tid=4711	domain=stepscope	msg=forward	msgtype=registered
//       	color=0xFF1F77B4	category=3	payload=-     (one line)
// Messages have tab, newline and backslash escaped (\t \n \\). Each line is one write(2) on an
// O_APPEND descriptor: lines from several threads never interleave, and a process that crashes
// leaves everything written before the crash.
#define NVTX_NO_IMPL
#include <nvtx3/nvToolsExt.h>

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>

namespace {

struct Domain {
  std::string name;
};
struct String {
  const Domain* domain;
  std::string text;
};

std::mutex g_mutex;                    // guards the two tables below
std::deque<Domain> g_domains;          // deque: handles (element addresses) stay valid
std::deque<String> g_strings;
std::atomic<uint64_t> g_next_range{1};  // range ids; 0 is never handed out
int g_fd = -1;                          // -1: count only

long thread_id() { return static_cast<long>(syscall(SYS_gettid)); }

std::string escape(const char* s) {
  std::string out;
  for (; s != nullptr && *s != '\0'; ++s) {
    switch (*s) {
      case '\t': out += "\\t"; break;
      case '\n': out += "\\n"; break;
      case '\\': out += "\\\\"; break;
      default: out += *s;
    }
  }
  return out;
}

// Handlers return before formatting anything when nothing is recorded (count-only mode), so
// the benchmark's "tool attached" column measures the dispatch, not this library's strings.
void emit(const std::string& line) {
  if (g_fd < 0) return;
  const std::string l = line + "\n";
  size_t done = 0;
  while (done < l.size()) {
    const ssize_t n = write(g_fd, l.data() + done, l.size() - done);
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

std::string domain_name(nvtxDomainHandle_t d) {
  return d == nullptr ? std::string("-") : reinterpret_cast<const Domain*>(d)->name;
}

std::string head(const char* event, nvtxDomainHandle_t d) {
  return std::string(event) + "\ttid=" + std::to_string(thread_id()) +
         "\tdomain=" + escape(domain_name(d).c_str());
}

std::string attributes(const nvtxEventAttributes_t* a) {
  if (a == nullptr) return "\tmsg=-\tmsgtype=none\tcolor=-\tcategory=0\tpayload=-";
  std::string s;
  switch (a->messageType) {
    case NVTX_MESSAGE_TYPE_ASCII:
      s += "\tmsg=" + escape(a->message.ascii) + "\tmsgtype=ascii";
      break;
    case NVTX_MESSAGE_TYPE_REGISTERED: {
      const auto* str = reinterpret_cast<const String*>(a->message.registered);
      s += "\tmsg=" + (str ? escape(str->text.c_str()) : std::string("-")) + "\tmsgtype=registered";
      break;
    }
    case NVTX_MESSAGE_TYPE_UNICODE:
      s += "\tmsg=-\tmsgtype=unicode";
      break;
    default:
      s += "\tmsg=-\tmsgtype=none";
  }
  char buf[64];
  if (a->colorType == NVTX_COLOR_ARGB) {
    std::snprintf(buf, sizeof(buf), "\tcolor=0x%08" PRIX32, a->color);
    s += buf;
  } else {
    s += "\tcolor=-";
  }
  s += "\tcategory=" + std::to_string(a->category);
  switch (a->payloadType) {
    case NVTX_PAYLOAD_TYPE_INT64: s += "\tpayload=" + std::to_string(a->payload.llValue); break;
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT64: s += "\tpayload=" + std::to_string(a->payload.ullValue); break;
    case NVTX_PAYLOAD_TYPE_INT32: s += "\tpayload=" + std::to_string(a->payload.iValue); break;
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT32: s += "\tpayload=" + std::to_string(a->payload.uiValue); break;
    case NVTX_PAYLOAD_TYPE_DOUBLE: s += "\tpayload=" + std::to_string(a->payload.dValue); break;
    case NVTX_PAYLOAD_TYPE_FLOAT: s += "\tpayload=" + std::to_string(a->payload.fValue); break;
    default: s += "\tpayload=-";
  }
  return s;
}

// ---- the CORE2 handlers, typed exactly as nvtxTypes.h declares them (checked by the
// static_casts in InitializeInjectionNvtx2).

nvtxDomainHandle_t NVTX_API DomainCreateA(const char* name) {
  const Domain* d;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_domains.push_back(Domain{name ? name : ""});
    d = &g_domains.back();
  }
  emit(std::string("DomainCreateA\ttid=") + std::to_string(thread_id()) + "\tdomain=" + escape(name));
  return reinterpret_cast<nvtxDomainHandle_t>(const_cast<Domain*>(d));
}

nvtxStringHandle_t NVTX_API DomainRegisterStringA(nvtxDomainHandle_t domain, const char* text) {
  const String* s;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_strings.push_back(String{reinterpret_cast<const Domain*>(domain), text ? text : ""});
    s = &g_strings.back();
  }
  emit(head("DomainRegisterStringA", domain) + "\tstring=" + escape(text));
  return reinterpret_cast<nvtxStringHandle_t>(const_cast<String*>(s));
}

void NVTX_API DomainNameCategoryA(nvtxDomainHandle_t domain, uint32_t category, const char* name) {
  emit(head("DomainNameCategoryA", domain) + "\tcategory=" + std::to_string(category) +
       "\tname=" + escape(name));
}

int NVTX_API DomainRangePushEx(nvtxDomainHandle_t domain, const nvtxEventAttributes_t* a) {
  if (g_fd < 0) return 0;
  emit(head("DomainRangePushEx", domain) + attributes(a));
  return 0;
}

int NVTX_API DomainRangePop(nvtxDomainHandle_t domain) {
  if (g_fd < 0) return 0;
  emit(head("DomainRangePop", domain));
  return 0;
}

nvtxRangeId_t NVTX_API DomainRangeStartEx(nvtxDomainHandle_t domain, const nvtxEventAttributes_t* a) {
  const uint64_t id = g_next_range.fetch_add(1);
  if (g_fd < 0) return id;
  emit(head("DomainRangeStartEx", domain) + attributes(a) + "\tid=" + std::to_string(id));
  return id;
}

void NVTX_API DomainRangeEnd(nvtxDomainHandle_t domain, nvtxRangeId_t id) {
  if (g_fd < 0) return;
  emit(head("DomainRangeEnd", domain) + "\tid=" + std::to_string(id));
}

void NVTX_API DomainMarkEx(nvtxDomainHandle_t domain, const nvtxEventAttributes_t* a) {
  if (g_fd < 0) return;
  emit(head("DomainMarkEx", domain) + attributes(a));
}

template <typename Fn>
void install(NvtxFunctionTable table, unsigned int size, int id, Fn fn) {
  if (id <= 0 || static_cast<unsigned int>(id) > size || table[id] == nullptr) return;
  *table[id] = reinterpret_cast<NvtxFunctionPointer>(fn);
}

}  // namespace

// Called once by every NVTX instance in the process that finds this library (each shared
// library that includes the NVTX headers has its own instance); each gets the same handlers.
extern "C" NVTX_DYNAMIC_EXPORT int NVTX_API
InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_export_table) {
  if (get_export_table == nullptr) return 0;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_fd < 0) {
      const char* path = std::getenv("STEPSCOPE_NVTX_LOG");
      if (path != nullptr && *path != '\0') {
        g_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      }
    }
  }
  const auto* callbacks = static_cast<const NvtxExportTableCallbacks*>(get_export_table(NVTX_ETID_CALLBACKS));
  if (callbacks == nullptr || callbacks->struct_size < sizeof(NvtxExportTableCallbacks)) return 0;
  const auto* version =
      static_cast<const NvtxExportTableVersionInfo*>(get_export_table(NVTX_ETID_VERSIONINFO));
  if (version != nullptr && version->struct_size >= sizeof(NvtxExportTableVersionInfo) &&
      version->SetInjectionNvtxVersion != nullptr) {
    version->SetInjectionNvtxVersion(NVTX_VERSION);
  }
  NvtxFunctionTable table = nullptr;
  unsigned int size = 0;
  if (!callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE2, &table, &size) || table == nullptr) return 0;
  install(table, size, NVTX_CBID_CORE2_DomainMarkEx,
          static_cast<nvtxDomainMarkEx_impl_fntype>(&DomainMarkEx));
  install(table, size, NVTX_CBID_CORE2_DomainRangeStartEx,
          static_cast<nvtxDomainRangeStartEx_impl_fntype>(&DomainRangeStartEx));
  install(table, size, NVTX_CBID_CORE2_DomainRangeEnd,
          static_cast<nvtxDomainRangeEnd_impl_fntype>(&DomainRangeEnd));
  install(table, size, NVTX_CBID_CORE2_DomainRangePushEx,
          static_cast<nvtxDomainRangePushEx_impl_fntype>(&DomainRangePushEx));
  install(table, size, NVTX_CBID_CORE2_DomainRangePop,
          static_cast<nvtxDomainRangePop_impl_fntype>(&DomainRangePop));
  install(table, size, NVTX_CBID_CORE2_DomainNameCategoryA,
          static_cast<nvtxDomainNameCategoryA_impl_fntype>(&DomainNameCategoryA));
  install(table, size, NVTX_CBID_CORE2_DomainRegisterStringA,
          static_cast<nvtxDomainRegisterStringA_impl_fntype>(&DomainRegisterStringA));
  install(table, size, NVTX_CBID_CORE2_DomainCreateA,
          static_cast<nvtxDomainCreateA_impl_fntype>(&DomainCreateA));
  emit(std::string("InitializeInjectionNvtx2\ttid=") + std::to_string(thread_id()));
  return 1;
}
