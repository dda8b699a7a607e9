"""Every torchvision classification model x every scheme through `finetune --epochs 0`.

For each model a state_dict with 1000 classes and non-trivial BatchNorm statistics is written to
disk, then the run path of the CLI (`finetune_process`) converts it with `--num-classes 10`: the ONNX
must match the original model (parity_vs_original) and the reparametrized one, with every weight
initializer in [-1, 1]. Results are appended to a JSON-lines file (finished pairs are skipped on a
re-run) and summarized as a table.

    python benchmarks/sweep_models.py --jobs 14 --results sweep.jsonl
    python benchmarks/sweep_models.py --models 'resnet*' --schemes layer-max --bn fold
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCHEMES = ["layer-max", "channel-max", "weight-std", "weight-norm", "none"]


def _randomize(model, seed=0):
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        for p in model.parameters():
            if p.numel() and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def one(task: tuple[str, list[str], str, int, int, str]) -> list[dict]:
    name, schemes, bn, samples, threads, tmp_root = task
    import torch

    torch.set_num_threads(threads)
    from wnconvert.convert.fold import FoldConfig
    from wnconvert.convert.schemes import SchemeConfig
    from wnconvert.convert.verify import VerifyConfig
    from wnconvert.models.run.run import RunConfig, finetune_process
    from wnconvert.models.zoo.zoo import build_model, min_image_size

    rows = []
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        sd = Path(tmp) / f"{name}.pth"
        torch.manual_seed(0)
        model = _randomize(build_model(name, "none", 1000).model)
        torch.save(model.state_dict(), sd)
        params = sum(p.numel() for p in model.parameters())
        del model
        size = max(min_image_size(name), 64)
        for scheme in schemes:
            t0 = time.time()
            row = {"model": name, "scheme": scheme, "bn": bn, "image_size": size, "params": params}
            try:
                cfg = RunConfig(model=name, out=Path(tmp) / scheme, weights=str(sd), num_classes=10,
                                image_size=size, scheme=SchemeConfig(scheme), fold=FoldConfig(bn),
                                verify=VerifyConfig(samples=samples))
                s = finetune_process(cfg)
                rep = s.report
                row.update(
                    ok=bool(rep["parity"]["passed"] and rep["parity_vs_original"]["passed"]
                            and rep["onnx_weights"]["max_abs"] <= 1.0),
                    onnx_max_abs=rep["onnx_weights"]["max_abs"], onnx_weights=rep["onnx_weights"]["count"],
                    rel_vs_reparam=max(c["rel"] for c in rep["parity"]["candidates"].values()),
                    rel_vs_original=max(c["rel"] for c in rep["parity_vs_original"]["candidates"].values()),
                    top1_vs_original=min(c["top1"] for c in rep["parity_vs_original"]["candidates"].values()),
                    onnx_mb=round((Path(tmp) / scheme / "model.onnx").stat().st_size / 2**20, 1))
            except BaseException as e:  # record and go on: the sweep reports every failure
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                           trace=traceback.format_exc()[-1500:])
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            import shutil
            shutil.rmtree(Path(tmp) / scheme, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="*", help="fnmatch pattern(s), comma separated")
    ap.add_argument("--exclude", default="", help="fnmatch pattern(s) to skip, comma separated")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--bn", default="keep", choices=["keep", "fold"])
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--results", type=Path, default=Path("sweep.jsonl"))
    ap.add_argument("--tmp", default=None, help="folder for the temporary run directories")
    args = ap.parse_args()

    import torchvision
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    pats = args.models.split(",")
    skip = [p for p in args.exclude.split(",") if p]
    names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)
             and not any(fnmatch.fnmatch(n, p) for p in skip)]
    schemes = args.schemes.split(",")
    done = set()
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["scheme"], r["bn"]))
    tasks = []
    for n in names:
        todo = [s for s in schemes if (n, s, args.bn) not in done]
        if todo:
            tasks.append((n, todo, args.bn, args.samples, args.threads, args.tmp))
    print(f"{len(tasks)} models to sweep ({len(names)} selected), {args.jobs} jobs", flush=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool, open(args.results, "a") as f:
        for rows in pool.imap_unordered(one, tasks):
            for r in rows:
                f.write(json.dumps(r) + "\n")
                f.flush()
                status = "ok " if r["ok"] else "FAIL"
                detail = r.get("error") or f"rel={r['rel_vs_original']:.1e} max|w|={r['onnx_max_abs']:.6f}"
                print(f"{status} {r['model']:22s} {r['scheme']:12s} {r['bn']:4s} {r['seconds']:7.1f}s {detail}",
                      flush=True)
    rows = [json.loads(line) for line in args.results.read_text().splitlines()]
    ok = sum(r["ok"] for r in rows)
    print(f"\n{ok} of {len(rows)} model/scheme/bn runs passed "
          f"({len({r['model'] for r in rows})} models)")
    for r in rows:
        if not r["ok"]:
            print(f"  FAIL {r['model']} {r['scheme']} {r['bn']}: {r.get('error', 'parity or range')}")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
