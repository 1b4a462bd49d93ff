// Otsu threshold of a uint8 image, bit-exact with OpenCV THRESH_OTSU as spelled out by
// reference.otsu_threshold_u8_2d: 256-bin histogram, then one float64 pass over the bins with
// the running class weight q1 and mean mu1 (same operation order, so ties resolve identically),
// first maximum of q1 q2 (mu1 - mu2)^2 kept, bins where a class weight is below FLT_EPSILON
// skipped.  O(n + 256).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cstddef>
#include <cstdint>

namespace diffcam {

inline int otsu_threshold_u8(const uint8_t* img, size_t n) {
  if (n == 0) return 0;
  uint32_t h4[4][256] = {};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    h4[0][img[i]]++;
    h4[1][img[i + 1]]++;
    h4[2][img[i + 2]]++;
    h4[3][img[i + 3]]++;
  }
  for (; i < n; ++i) h4[0][img[i]]++;
  double hist[256];
  for (int b = 0; b < 256; ++b)
    hist[b] = static_cast<double>(static_cast<uint64_t>(h4[0][b]) + h4[1][b] + h4[2][b] + h4[3][b]);
  const double scale = 1.0 / static_cast<double>(n);
  double mu = 0.0;
  for (int b = 0; b < 256; ++b) mu += b * hist[b];
  mu *= scale;
  const double eps = static_cast<double>(FLT_EPSILON);
  double q1 = 0.0, mu1 = 0.0, best_sigma = 0.0;
  int best_t = 0;
  for (int b = 0; b < 256; ++b) {
    const double p_i = hist[b] * scale;
    mu1 *= q1;
    q1 += p_i;
    const double q2 = 1.0 - q1;
    if (std::min(q1, q2) < eps || std::max(q1, q2) > 1.0 - eps) continue;
    mu1 = (mu1 + b * p_i) / q1;
    const double mu2 = (mu - q1 * mu1) / q2;
    const double sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
    if (sigma > best_sigma) {
      best_sigma = sigma;
      best_t = b;
    }
  }
  return best_t;
}

}  // namespace diffcam
