// Bilinear resize with half-pixel centres and edge clamping (OpenCV INTER_LINEAR without its
// fixed-point rounding), in float64 with the reference's exact operation order (the TU is built
// with -ffp-contract=off) so the resized values round to the same float32 as the reference.
// Taps per output row/column are precomputed; O(out_h out_w).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

namespace diffcam {

struct Tap {
  int a, b;
  double t;
};

inline void bilinear_taps(int n_out, int n_in, std::vector<Tap>& taps) {
  taps.resize(n_out);
  const double sc = static_cast<double>(n_in) / static_cast<double>(n_out);
  for (int d = 0; d < n_out; ++d) {
    const double s = (d + 0.5) * sc - 0.5;
    const double i0 = std::floor(s);
    const double t = s - i0;
    const long i = static_cast<long>(i0);
    taps[d].a = static_cast<int>(std::min<long>(std::max<long>(i, 0), n_in - 1));
    taps[d].b = static_cast<int>(std::min<long>(std::max<long>(i + 1, 0), n_in - 1));
    taps[d].t = t;
  }
}

// Resized map in float64 (out has oh*ow entries).  Identity copy when the size is unchanged.
inline void resize_bilinear_d(const float* m, int h, int w, int oh, int ow, double* out,
                              std::vector<Tap>& ty, std::vector<Tap>& tx) {
  if (oh == h && ow == w) {
    for (long i = 0; i < static_cast<long>(h) * w; ++i) out[i] = m[i];
    return;
  }
  bilinear_taps(oh, h, ty);
  bilinear_taps(ow, w, tx);
  for (int y = 0; y < oh; ++y) {
    const Tap& Y = ty[y];
    const float* r0 = m + static_cast<long>(Y.a) * w;
    const float* r1 = m + static_cast<long>(Y.b) * w;
    const double fy = Y.t;
    double* o = out + static_cast<long>(y) * ow;
    for (int x = 0; x < ow; ++x) {
      const Tap& X = tx[x];
      const double fx = X.t;
      const double top = static_cast<double>(r0[X.a]) * (1 - fx) + static_cast<double>(r0[X.b]) * fx;
      const double bot = static_cast<double>(r1[X.a]) * (1 - fx) + static_cast<double>(r1[X.b]) * fx;
      o[x] = top * (1 - fy) + bot * fy;
    }
  }
}

}  // namespace diffcam
