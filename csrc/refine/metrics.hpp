// Localization metrics of one map against its C class masks (method.md 3): the map is resized
// to the mask size (float64, resize.hpp), scaled to uint8 by floor(clamp(float32(r) * 255f,
// 0, 255)) and thresholded by Otsu (prediction u8 > t); Obj-IoU = max over classes of
// |P & G| / |P | G| (0 for an empty union); contrast = mean(r[fg]) / (mean(r[bg]) + 1e-8),
// concentration = sum(r[fg]) / (sum(r) + 1e-8), fg = any class mask.  O(Hm Wm (C + 1)).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "otsu.hpp"
#include "resize.hpp"

namespace diffcam {

inline uint8_t to_u8(double r) {
  float v = static_cast<float>(r) * 255.0f;
  v = std::min(std::max(v, 0.0f), 255.0f);
  return static_cast<uint8_t>(std::floor(v));
}

struct LocWork {
  std::vector<double> r;
  std::vector<uint8_t> u8, fg;
  std::vector<Tap> ty, tx;
};

inline void localization_map(const float* m, int h, int w, const uint8_t* masks, int C, int Hm, int Wm,
                             double* res3, LocWork& wk) {
  const long n = static_cast<long>(Hm) * Wm;
  wk.r.resize(n);
  wk.u8.resize(n);
  wk.fg.assign(n, 0);
  resize_bilinear_d(m, h, w, Hm, Wm, wk.r.data(), wk.ty, wk.tx);
  for (long i = 0; i < n; ++i) wk.u8[i] = to_u8(wk.r[i]);
  const int t = otsu_threshold_u8(wk.u8.data(), static_cast<size_t>(n));
  double iou = 0.0;
  for (int c = 0; c < C; ++c) {
    const uint8_t* g = masks + static_cast<long>(c) * n;
    long inter = 0, uni = 0;
    for (long i = 0; i < n; ++i) {
      const bool pr = wk.u8[i] > t, gt = g[i] != 0;
      inter += pr && gt;
      uni += pr || gt;
      if (gt) wk.fg[i] = 1;
    }
    if (uni) iou = std::max(iou, static_cast<double>(inter) / static_cast<double>(uni));
  }
  double sfg = 0.0, sbg = 0.0;
  long nfg = 0;
  for (long i = 0; i < n; ++i) {
    if (wk.fg[i]) {
      sfg += wk.r[i];
      ++nfg;
    } else {
      sbg += wk.r[i];
    }
  }
  const long nbg = n - nfg;
  const double mean_fg = nfg ? sfg / nfg : 0.0, mean_bg = nbg ? sbg / nbg : 0.0;
  res3[0] = iou;
  res3[1] = mean_fg / (mean_bg + 1e-8);
  res3[2] = sfg / ((sfg + sbg) + 1e-8);
}

}  // namespace diffcam
