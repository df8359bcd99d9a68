#include "build_info.h"

#if defined(STEPSCOPE_WITH_CUDA)
#include <cuda.h>
#endif

namespace stepscope {

BuildInfo build_info() {
  BuildInfo b;
  b.torch_version = STEPSCOPE_TORCH_VERSION;
#if defined(STEPSCOPE_WITH_CUDA)
  b.cuda = true;
  b.cuda_archs = STEPSCOPE_CUDA_ARCHS;
#if defined(CUDA_VERSION)
  b.cuda_version = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#endif
#endif
#if defined(STEPSCOPE_WITH_NVTX)
  b.nvtx = true;
#endif
  return b;
}

}  // namespace stepscope
