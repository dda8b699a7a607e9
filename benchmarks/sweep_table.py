"""Markdown summary of a sweep_models.py results file: one row per model."""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    by_model = defaultdict(list)
    for r in rows:
        by_model[r["model"]].append(r)
    print("| model | params (M) | input | schemes passed | worst rel. error vs original | max \\|w\\| in ONNX |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for name in sorted(by_model):
        rs = by_model[name]
        ok = [r for r in rs if r["ok"]]
        rel = max((r["rel_vs_original"] for r in ok), default=float("nan"))
        mx = max((r["onnx_max_abs"] for r in ok), default=float("nan"))
        fails = [f"{r['scheme']} ({r.get('error', 'parity')[:60]})" for r in rs if not r["ok"]]
        passed = f"{len(ok)}/{len(rs)} ({rs[0]['bn']})" + (f"; failed: {', '.join(fails)}" if fails else "")
        print(f"| {name} | {rs[0]['params'] / 1e6:.1f} | {rs[0]['image_size']} | {passed} | {rel:.1e} | {mx:.6f} |")
    ok = sum(r["ok"] for r in rows)
    print(f"\n{ok} of {len(rows)} model/scheme runs passed, {len(by_model)} models.")


if __name__ == "__main__":
    main(sys.argv[1])
