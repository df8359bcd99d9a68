// The project's dtype dispatch, written once (built on AT_DISPATCH_SWITCH).
#pragma once

#include <ATen/Dispatch.h>

#include <cstdint>

// Predictions: float32, float16, bfloat16, and float64 (CPU only; refused earlier on CUDA).
#define STEPSCOPE_DISPATCH_PREDS(TYPE, NAME, ...)                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                                     STEPSCOPE_DISPATCH_DOUBLE_CASE(__VA_ARGS__))

#if defined(__CUDACC__)
#define STEPSCOPE_DISPATCH_DOUBLE_CASE(...)
#else
#define STEPSCOPE_DISPATCH_DOUBLE_CASE(...) AT_DISPATCH_CASE(at::ScalarType::Double, __VA_ARGS__)
#endif

// Targets: the integer dtypes the kernels read directly (bool is read as uint8; others are
// converted to int32 by prepare_update). Binds target_t.
#define STEPSCOPE_DISPATCH_TARGET(TYPE, NAME, ...)                                 \
  [&] {                                                                            \
    switch (TYPE) {                                                                \
      case at::ScalarType::Long: {                                                 \
        using target_t = int64_t;                                                  \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case at::ScalarType::Int: {                                                  \
        using target_t = int32_t;                                                  \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      case at::ScalarType::Byte:                                                   \
      case at::ScalarType::Bool: {                                                 \
        using target_t = uint8_t;                                                  \
        return __VA_ARGS__();                                                      \
      }                                                                            \
      default:                                                                     \
        TORCH_CHECK(false, "stepscope: ", NAME, ": unexpected target dtype ", TYPE); \
    }                                                                              \
  }()
