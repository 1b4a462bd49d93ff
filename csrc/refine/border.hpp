// Reflect-101 border handling (`dcb|abcd|cba`, OpenCV BORDER_REFLECT_101, NumPy 'reflect').
//
// An index at any distance is folded with period 2n-2 (n = 1 maps every index to 0), so windows
// wider than the map are legal.  O(1) per index; the filters call it only while building padded
// copies or index tables, never in their inner loops.
#pragma once

namespace diffcam {

inline int fold_reflect101(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * n - 2;
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

}  // namespace diffcam
