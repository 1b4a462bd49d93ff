// The whole refinement of one map (method.md 2): raw_max; AKD (kernel size + rank filter, if
// akd); DACG; CBA (if cba); clip to [0, max(raw_max, 0)] and min-max; SICD (if sicd).
// Intermediate maps are float32 in a per-thread Workspace (no allocation after warm-up);
// statistics are float64.  Cost is dominated by the rank filter: O(H W k^2 log^2 k^2 / L).
// clip + min-max hands the sums and extremes of its result to SICD (one pass fewer).
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
  minmax_f(in, n, raw_min, raw_max);
  const float* cur = in;
  ws.a.resize(n);
  if (p[P::akd] != 0.0) {
    info.k = kernel_size_map(in, H, W, p);
    rank_filter_map(in, ws.a.data(), H, W, info.k, ws.pad, filter_threads,
                    [](long nn, int t, auto&& fn) { parallel_for(nn, t, fn); });
    cur = ws.a.data();
  }
  GateInfo gi = confidence_gating_map(cur, out, H, W, p, ws.scratch, ws.tmp);
  info.branch = gi.branch;
  info.tau = gi.tau;
  if (p[P::cba] != 0.0) info.tau_bg = background_attenuation_map(out, out, n, p, ws.scratch);
  MapStats4 st;
  clip_normalize_map(out, n, static_cast<double>(raw_max), p[P::norm_eps], &st);
  if (p[P::sicd] != 0.0) {
    DebiasInfo di = causal_debiasing_map(out, rep, rep_const, out, n, p, ws.dbuf, &st);
    info.lam = di.lam;
    info.applied = di.applied;
  }
  return info;
}

}  // namespace diffcam
