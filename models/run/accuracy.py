"""Accuracy of a checkpoint (PyTorch) or an ONNX file (onnxruntime or OpenVINO) on a data spec.

The preprocessing is the run's (``manifest.json`` of the run directory, or of the folder holding
the ONNX file / checkpoint); without a manifest, the data spec's default at the model's input size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.metrics import topk_correct
from wnconvert.convert.openvino_rt import check_runtime, file_runner

from ..data.data import Preprocess, default_preprocess, eval_arrays
from .precheck import check_eval
from .rundir import CHECKPOINT, MANIFEST, RunDir


def _preprocess_for(artifact: Path, spec: str, image_size: int | None) -> tuple[Preprocess, Path | None]:
    run_dir = artifact if artifact.is_dir() else artifact.parent
    if (run_dir / MANIFEST).exists():
        return RunDir(run_dir).manifest().preprocess, run_dir
    return default_preprocess(spec, image_size), None


def artifact_accuracy(artifact: Path, data: str, *, limit: int | None = None, batch: int = 64,
             provider: str = "cpu", runtime: str = "onnxruntime") -> dict:
    """Top-1, top-5 and images/s of ``artifact`` on the validation split of ``data``.

    ``artifact``: an ``.onnx`` file, a run directory, or a run's ``checkpoint.safetensors``.
    ``runtime`` (onnxruntime | openvino) runs an ``.onnx`` file; a checkpoint runs in PyTorch."""
    artifact = Path(artifact)
    check_eval(artifact, provider, batch)
    if artifact.is_file() and artifact.suffix == ".tflite":
        return _tflite_accuracy(artifact, data, limit, batch, provider, runtime)
    check_runtime(runtime, provider)
    is_onnx = artifact.is_file() and artifact.suffix == ".onnx"
    if runtime != "onnxruntime" and not is_onnx:
        raise UserInputError(f"--runtime {runtime} runs an .onnx file; {artifact} is not one "
                             "(a run directory or checkpoint is evaluated in PyTorch)")
    if not is_onnx and artifact.is_file() and artifact.name != CHECKPOINT:
        raise UserInputError(f"{artifact} is neither an .onnx file, a run directory nor its {CHECKPOINT}")
    image_size = None
    if is_onnx:
        from wnconvert.convert.reading import load_onnx

        model = load_onnx(artifact, external_data=False)  # regular file, bounded, one line
        try:
            dims = model.graph.input[0].type.tensor_type.shape.dim
            image_size = dims[-1].dim_value or None
        except (IndexError, AttributeError):
            raise UserInputError(f"{artifact} is not a readable ONNX file (no image input)") from None
    pre, run_dir = _preprocess_for(artifact, data, image_size)
    images, labels = eval_arrays(data, pre, limit=limit)
    if is_onnx:
        run, backend = file_runner(artifact, runtime, provider)
    else:
        import torch

        if run_dir is None:
            raise UserInputError(f"{artifact} is not a run directory (no {MANIFEST})")
        rd = RunDir(run_dir)  # an --act-bits run: its fake-quant (deployed) network
        model = rd.load_qat()[1] if rd.manifest().act is not None else rd.load()[1]
        if provider == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--provider cuda: PyTorch sees no CUDA device here")
        device = provider
        model = model.to(device).eval()

        def run(x):
            with torch.no_grad():
                return model(torch.from_numpy(x).to(device)).float().cpu().numpy()
        backend = f"pytorch/{device}"
    return _score(artifact, data, run, images, labels, batch, runtime if is_onnx else "pytorch", backend)


def _tflite_accuracy(artifact: Path, data: str, limit: int | None, batch: int, provider: str, runtime: str) -> dict:
    """A .tflite file in TensorFlow Lite Micro (``--runtime`` left at its default) or LiteRT."""
    from wnconvert.convert.tflite_eval import tflite_runner

    if provider != "cpu":
        raise UserInputError(f"a .tflite file runs on the CPU here, not --provider {provider}")
    runtime = "tflite-micro" if runtime == "onnxruntime" else runtime
    run, backend, size = tflite_runner(artifact, runtime)
    pre, _ = _preprocess_for(artifact, data, size)
    images, labels = eval_arrays(data, pre, limit=limit)
    if images.shape[-1] != size or images.shape[1] not in (1, 3):
        raise UserInputError(f"{artifact} takes {size} px images; the preprocessing gives {images.shape[-1]} px")
    return _score(artifact, data, run, images, labels, batch, runtime, backend)


def _score(artifact: Path, data: str, run, images: np.ndarray, labels: np.ndarray, batch: int, runtime: str,
           backend: str) -> dict:
    out = run(images[:1])  # warm-up, not timed
    if np.ndim(out) != 2:
        raise UserInputError(f"{artifact} outputs shape {tuple(np.shape(out))}, not (batch, classes) logits")
    top1 = top5 = 0
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        logits = run(np.ascontiguousarray(images[i:i + batch]))
        a, b = topk_correct(logits, labels[i:i + batch])
        top1, top5 = top1 + a, top5 + b
    seconds = time.perf_counter() - t0
    n = max(len(images), 1)
    return {"artifact": str(artifact), "data": data, "runtime": runtime,
            "backend": backend, "images": int(len(images)),
            "top1": top1 / n, "top5": top5 / n,
            "images_per_s": len(images) / seconds if seconds > 0 else float("inf")}
