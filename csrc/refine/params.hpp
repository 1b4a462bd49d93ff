// Positions of the fields of the flat float64 parameter vector (RefineConfig.to_params()).
//
// This mirrors PARAM_FIELDS in diffcam/refine/config.py one to one; the vector is append-only,
// so an index never changes meaning.  The kernels read the vector through these names only.
// Constant-time lookups, no allocation.
#pragma once

namespace diffcam {
namespace P {
enum : int {
  akd = 0, k_base, k_max, steps, step_div, step_cap, std_factor, std_cap, size_div, size_cap,
  kernel_size,
  dacg = 11, var_threshold, high_mean, low_mean, pct_high_var, pct_high_mean, pct_low_mean,
  pct_default, tau_floor, blur_sigma, reserved21,
  cba = 22, bg_w_median, bg_w_pct, bg_w_mean, bg_w_max, bg_percentile, gamma, tau_bg_floor,
  sicd = 30, w_rep, w_out, outlier_sigmas, lambda_min, lambda_max, gate, gate_std, gate_skew,
  range_guard,
  norm_eps = 40, final_normalize,
  count
};
}  // namespace P
constexpr int kNumParams = P::count;
}  // namespace diffcam
