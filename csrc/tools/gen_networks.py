#!/usr/bin/env python3
"""Emit csrc/refine/networks.hpp: straight-line Batcher odd-even merge-sort networks.

One function template per window size n = k*k for k in 3, 5, 7, 9, 11.  Each comparator is
``O::ce(v[i], v[j])`` (min into v[i], max into v[j]) so the same network serves the AVX2
(8 pixels per vector) and the scalar translation units.  Batcher's network (pruned from the next
power of two) is used rather than the best-known ones: its recursive structure spills fewer
vectors (see shared/docs/performance.md, section 2.3).  The two-window (SortNet2) networks are
reordered by schedule() for register locality (same comparators, same results; measured 5-10%
faster at k = 7..11 with g++ 12).  The output is checked into the repository;
re-run ``python csrc/tools/gen_networks.py`` after changing it.
"""
import itertools
import os
import random


def oddeven_merge(lo, hi, r):
    step = r * 2
    if step < hi - lo:
        yield from oddeven_merge(lo, hi, step)
        yield from oddeven_merge(lo + r, hi, step)
        yield from [(i, i + r) for i in range(lo + r, hi - r, step)]
    else:
        yield (lo, lo + r)


def oddeven_merge_sort_range(lo, hi):
    if hi - lo >= 1:
        mid = lo + (hi - lo) // 2
        yield from oddeven_merge_sort_range(lo, mid)
        yield from oddeven_merge_sort_range(mid + 1, hi)
        yield from oddeven_merge(lo, hi, 1)


def batcher_sort(n):
    N = 1
    while N < n:
        N *= 2
    return [(i, j) for (i, j) in oddeven_merge_sort_range(0, N - 1) if j < n]


def merge_runs(a, b, out):
    """Odd-even merge of two sorted runs of any lengths (lists of slot names).

    Appends comparators (min into the first slot) to ``out`` and returns the merged run as the
    list of slots holding ranks 0, 1, ... (Batcher's merge, arbitrary lengths: merge the odd and
    the even subsequences, then one row of compare-exchanges).
    """
    if not a:
        return list(b)
    if not b:
        return list(a)
    if len(a) == 1 and len(b) == 1:
        out.append((a[0], b[0]))
        return [a[0], b[0]]
    v = merge_runs(a[0::2], b[0::2], out)
    w = merge_runs(a[1::2], b[1::2], out)
    res = [v[0]]
    for i, wi in enumerate(w):
        if i + 1 < len(v):
            out.append((wi, v[i + 1]))
            res += [wi, v[i + 1]]
        else:
            res.append(wi)
    res += v[len(w) + 1:]
    return res


def sort_slots(slots, out):
    """Batcher sort of the given slots in place (positional); returns the slots in rank order."""
    for i, j in batcher_sort(len(slots)):
        out.append((slots[i], slots[j]))
    return list(slots)


def merge_all(runs, out):
    while len(runs) > 1:
        nxt = [merge_runs(runs[i], runs[i + 1], out) for i in range(0, len(runs) - 1, 2)]
        if len(runs) % 2:
            nxt.append(runs[-1])
        runs = nxt
    return runs[0]


def pair_network(k):
    """Two vertically adjacent k x k windows from (k + 1) x k loads v[dy * k + dx].

    Window A is rows 0..k-1, window B rows 1..k.  The (k - 1) x k core (rows 1..k-1) is sorted
    once: its k columns of k - 1 (Batcher), then the columns merged pairwise.  Each window then
    sorts its own row of k and merges it into (a copy of) the core.  Returns the list of
    statements (('ce', x, y) or ('cp', dst, src)) and the rank-ordered slots of A and B.
    """
    ops = []
    cols = []
    for dx in range(k):
        col = [f"v[{dy * k + dx}]" for dy in range(1, k)]
        net = []
        cols.append(sort_slots(col, net))
        ops += [("ce", x, y) for x, y in net]
    net = []
    core = merge_all(cols, net)
    ops += [("ce", x, y) for x, y in net]
    copy = [f"t[{i}]" for i in range(len(core))]
    ops += [("cp", d, s) for d, s in zip(copy, core)]
    res = []
    for own_row, base in ((0, core), (k, copy)):
        net = []
        own = sort_slots([f"v[{own_row * k + dx}]" for dx in range(k)], net)
        res.append(merge_runs(base, own, net))
        ops += [("ce", x, y) for x, y in net]
    return schedule(ops, SCHED_REGS), res[0], res[1]


SCHED_REGS = int(os.environ.get("GEN_SCHED_REGS", "12"))


def schedule(ops, regs=12):
    """Reorder a straight-line list of ops for register locality (same dependencies).

    ops: ('ce', x, y) / ('cp', dst, src) over named slots.  Every op is ordered after the
    previous op that touches any of its slots (read or write), so the result of every
    comparator is unchanged.  List scheduling: among the ready ops, take the one with the most
    operands among the `regs` most recently used slots (ties: original order).  The compiler
    keeps the order when it allocates registers, so this turns most spill reloads of the
    merges into register operands.
    """
    n = len(ops)
    last = {}
    preds = [[] for _ in range(n)]
    succs = [[] for _ in range(n)]
    for i, (_, x, y) in enumerate(ops):
        for sl in (x, y):
            if sl in last and last[sl] not in preds[i]:
                preds[i].append(last[sl])
                succs[last[sl]].append(i)
            last[sl] = i
    indeg = [len(p) for p in preds]
    ready = [i for i in range(n) if indeg[i] == 0]
    recent = []  # most recent last
    out = []
    while ready:
        best, bscore = None, None
        for i in ready:
            _, x, y = ops[i]
            sc = (x in recent) + (y in recent)
            if bscore is None or sc > bscore or (sc == bscore and i < best):
                best, bscore = i, sc
        ready.remove(best)
        out.append(ops[best])
        for sl in ops[best][1:]:
            if sl in recent:
                recent.remove(sl)
            recent.append(sl)
        del recent[:-regs]
        for j in succs[best]:
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    assert len(out) == n
    return out


def check_pair(k, trials=1000):
    import re
    ops, ra, rb = pair_network(k)
    rng = random.Random(k)
    for _ in range(trials):
        env = {}
        vals = [rng.choice([rng.random(), 0.5]) for _ in range((k + 1) * k)]
        for i, x in enumerate(vals):
            env[f"v[{i}]"] = x
        for op, x, y in ops:
            if op == "ce":
                if env[x] > env[y]:
                    env[x], env[y] = env[y], env[x]
            else:
                env[x] = env[y]
        assert [env[s] for s in ra] == sorted(vals[: k * k]), k
        assert [env[s] for s in rb] == sorted(vals[k:]), k
    return sum(1 for o in ops if o[0] == "ce")


def check(net, n, trials=2000):
    rng = random.Random(n)
    for _ in range(trials):
        v = [rng.random() for _ in range(n)]
        w = list(v)
        for i, j in net:
            if w[i] > w[j]:
                w[i], w[j] = w[j], w[i]
        assert w == sorted(v), n


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "..", "refine", "networks.hpp")
    lines = [
        "// GENERATED by csrc/tools/gen_networks.py -- do not edit.",
        "//",
        "// Straight-line Batcher odd-even merge-sort networks for the k x k windows of the",
        "// rank-weighted Gaussian filter, k = 3, 5, 7, 9, 11 (n = 9, 25, 49, 81, 121 values;",
        "// 28, 140, 394, 864, 1388 compare-exchanges).  O::ce(a, b) leaves min in a, max in b.",
        "// Larger windows use the same construction driven by a runtime comparator list",
        "// (rank_filter.hpp), which keeps compile time bounded.",
        "#pragma once",
        "",
        "namespace diffcam {",
        "",
        "template <int N> struct SortNet;",
        "",
    ]
    for k in (3, 5, 7, 9, 11):
        n = k * k
        net = batcher_sort(n)
        check(net, n)
        lines.append(f"template <> struct SortNet<{n}> {{")
        lines.append(f"  static constexpr int kComparators = {len(net)};")
        lines.append("  template <class O, class V> static inline void run(V* v) {")
        for i, j in net:
            lines.append(f"    O::ce(v[{i}], v[{j}]);")
        lines.append("  }")
        lines.append("};")
        lines.append("")
    lines += [
        "// Two vertically adjacent windows (output rows y and y + 1) at once: v holds the",
        "// (K + 1) x K loads v[dy * K + dx] (rows y .. y + K of the padded map); the shared",
        "// (K - 1) x K core is sorted once (columns, then pairwise odd-even merges), then each",
        "// window sorts its own row of K and merges it in.  Sorted windows go to a and b.",
        "// v is clobbered.",
        "template <int K> struct SortNet2;",
        "",
    ]
    for k in (3, 5, 7, 9, 11):
        n = k * k
        ncmp = check_pair(k)
        ops, ra, rb = pair_network(k)
        lines.append(f"template <> struct SortNet2<{k}> {{")
        lines.append(f"  static constexpr int kComparators = {ncmp};  // for two windows")
        lines.append("  template <class O, class V> static inline void run(V* v, V* a, V* b) {")
        lines.append(f"    V t[{k * (k - 1)}];")
        for op, x, y in ops:
            if op == "ce":
                lines.append(f"    O::ce({x}, {y});")
            else:
                lines.append(f"    {x} = {y};")
        for i, sl in enumerate(ra):
            lines.append(f"    a[{i}] = {sl};")
        for i, sl in enumerate(rb):
            lines.append(f"    b[{i}] = {sl};")
        lines.append("  }")
        lines.append("};")
        lines.append("")
    lines.append("}  // namespace diffcam")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", os.path.normpath(out))


if __name__ == "__main__":
    main()
