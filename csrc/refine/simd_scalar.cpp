// Portable scalar translation unit (baseline ISA): the 1-lane rank filter rows, used when the
// CPU lacks AVX2/FMA (or the compiler cannot target them).
#include "rank_filter.hpp"
#include "simd_ops.hpp"

namespace diffcam {
void rank_rows_scalar(const float* pad, int stride, float* out, int W, int k, int y0, int y1) {
  rank_rows<OpsScalar>(pad, stride, out, W, k, y0, y1);
}
}  // namespace diffcam
