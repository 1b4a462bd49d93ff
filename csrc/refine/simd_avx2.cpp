// AVX2 + FMA translation unit (compiled with -mavx2 -mfma): the 8-lane rank filter rows.
// Selected at runtime by rank_dispatch() when the CPU supports AVX2 and FMA.
#include "rank_filter.hpp"
#include "simd_ops.hpp"

namespace diffcam {
#if defined(__AVX2__) && defined(__FMA__)
void rank_rows_avx2(const float* pad, int stride, float* out, int W, int k, int y0, int y1) {
  rank_rows<OpsAVX2>(pad, stride, out, W, k, y0, y1);
}
bool have_avx2_build() { return true; }
#else
void rank_rows_avx2(const float* pad, int stride, float* out, int W, int k, int y0, int y1) {
  rank_rows_scalar(pad, stride, out, W, k, y0, y1);
}
bool have_avx2_build() { return false; }
#endif
}  // namespace diffcam
