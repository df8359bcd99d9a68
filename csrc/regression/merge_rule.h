// Chan, Golub and LeVeque's pairwise rule for merging two sets of means and centred moments,
// on one output's fields (regression.h's Field order). Used by the CPU kernel (blocks into
// chunks, chunks into the state) and, in ATen form, by regression::merge.
#pragma once

#include <algorithm>

#include "regression/regression.h"

namespace stepscope::regression {

// a <- a merged with b (kFields doubles each).
inline void merge_fields(double* a, const double* b) {
  a[kNonfinite] += b[kNonfinite];
  const double nb = b[kCount];
  if (nb == 0) return;
  const double na = a[kCount];
  if (na == 0) {
    for (int f = 0; f < kNonfinite; ++f) a[f] = b[f];
    return;
  }
  const double n = na + nb, w = nb / n, g = na * nb / n;
  const double dp = b[kMeanP] - a[kMeanP], dt = b[kMeanT] - a[kMeanT], de = b[kMeanE] - a[kMeanE];
  a[kCount] = n;
  a[kMeanP] += dp * w;
  a[kMeanT] += dt * w;
  a[kMeanE] += de * w;
  a[kM2P] += b[kM2P] + dp * dp * g;
  a[kM2T] += b[kM2T] + dt * dt * g;
  a[kCoPT] += b[kCoPT] + dp * dt * g;
  a[kM2E] += b[kM2E] + de * de * g;
  a[kSumAbsE] += b[kSumAbsE];
  a[kMaxAbsE] = std::max(a[kMaxAbsE], b[kMaxAbsE]);
  a[kSumApe] += b[kSumApe];
}

}  // namespace stepscope::regression
