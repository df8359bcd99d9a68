// What this build of stepscope was compiled with.
#pragma once

#include <string>

namespace stepscope {

struct BuildInfo {
  std::string torch_version;  // the torch the library was compiled against
  bool cuda = false;          // CUDA kernels compiled in
  std::string cuda_version;   // toolkit version used to compile them ("" without CUDA)
  std::string cuda_archs;     // TORCH_CUDA_ARCH_LIST the kernels were built for
  bool nvtx = false;          // NVTX ranges compiled in
};

BuildInfo build_info();

}  // namespace stepscope
