// The whole refinement of one map (method.md 2): raw_max; AKD (kernel size + rank filter, if
// akd); DACG; CBA (if cba); clip to [0, max(raw_max, 0)] and min-max; SICD (if sicd).
// Intermediate maps are float32 in a per-thread Workspace (no allocation after warm-up);
// statistics are float64.  Cost is dominated by the rank filter: O(H W k^2 log^2 k^2 / L).
// Passes are fused where the data allow: the raw min / max ride with the kernel size's sums;
// DACG's output pass gathers CBA's statistics and the min / max of its result; CBA's
// attenuation, the clip and the min-max run as one pass (CBA is monotone, so the extremes of its
// output are known beforehand), which hands its sums and extremes to SICD.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "attenuation.hpp"
#include "debias.hpp"
#include "gating.hpp"
#include "kernel_size.hpp"
#include "params.hpp"
#include "parallel.hpp"
#include "rank_filter.hpp"

namespace diffcam {

struct Workspace {
  std::vector<float> pad, a, b, scratch, tmp;
  std::vector<double> dbuf;
};

struct RefineInfo {
  int k, branch;
  double tau, tau_bg, lam;
  unsigned char applied;
};

inline RefineInfo refine_map(const float* in, const float* rep, double rep_const, float* out, int H,
                             int W, const double* p, Workspace& ws, int filter_threads) {
  const size_t n = static_cast<size_t>(H) * W;
  RefineInfo info{0, 3, 0.0, NAN, NAN, 0};
  float raw_min, raw_max;
  const float* cur = in;
  ws.a.resize(n);
  if (p[P::akd] != 0.0) {
    if (p[P::kernel_size] > 0) {
      minmax_f(in, n, raw_min, raw_max);
      info.k = static_cast<int>(p[P::kernel_size]);
    } else {  // one pass: the raw extremes and the sums of the mean (mean_std's order)
      double s[4];
      sum4_minmax(in, n, s, raw_min, raw_max);
      info.k = kernel_size_from_std(H, p, mean_std_from_sums(in, n, s).std);
    }
    rank_filter_map(in, ws.a.data(), H, W, info.k, ws.pad, filter_threads,
                    [](long nn, int t, auto&& fn) { parallel_for(nn, t, fn); });
    cur = ws.a.data();
  } else {
    minmax_f(in, n, raw_min, raw_max);
  }
  (void)raw_min;
  PosStats ps;  // of DACG's output: CBA's statistics and the extremes for clip + min-max
  GateInfo gi = confidence_gating_map(cur, out, H, W, p, ws.scratch, ws.tmp, &ps);
  info.branch = gi.branch;
  info.tau = gi.tau;
  MapStats4 st;
  if (p[P::cba] != 0.0) {
    info.tau_bg = background_threshold_from(out, n, p, ps, ws.scratch);
    cba_clip_normalize_map(out, out, n, CbaOp{info.tau_bg, p[P::gamma]}, ps.mn, ps.mx,
                           static_cast<double>(raw_max), p[P::norm_eps], &st);
  } else {
    clip_normalize_map(out, n, static_cast<double>(raw_max), p[P::norm_eps], &st, &ps.mn, &ps.mx);
  }
  if (p[P::sicd] != 0.0) {
    DebiasInfo di = causal_debiasing_map(out, rep, rep_const, out, n, p, ws.dbuf, &st);
    info.lam = di.lam;
    info.applied = di.applied;
  }
  return info;
}

}  // namespace diffcam
