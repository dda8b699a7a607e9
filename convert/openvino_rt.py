"""Running an ONNX file in OpenVINO's CPU plugin, the second runtime wnconvert checks its files in.

OpenVINO is optional (the ``test`` extra installs it): nothing here imports it until a file is
compiled, and a missing install is one line naming the pip command. The CPU plugin's default
inference precision is bf16 on CPUs with AMX/AVX512-BF16, which would blur every comparison with
onnxruntime; :func:`ov_compile` sets ``INFERENCE_PRECISION_HINT`` to f32 explicitly (quantized QDQ
subgraphs still run in the plugin's integer kernels; the hint governs the float parts).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from .errors import UserInputError
from .names import RUNTIMES
from .runtime import ort_session, run_batches, session_runner

PRECISION_HINTS = ("f32", "bf16", "f16")
DEVICE = "CPU"


def openvino_module():
    """The ``openvino`` package, or a UserInputError naming the install command."""
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise UserInputError("OpenVINO is not installed here: pip install openvino") from None


def openvino_version() -> str:
    return openvino_module().get_version().split("-")[0]


def check_runtime(name: str, provider: str = "cpu") -> str:
    """``name`` if it is a runtime that can run on ``provider`` (OpenVINO: its CPU plugin only)."""
    if name not in RUNTIMES:
        raise UserInputError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    if name == "openvino" and provider != "cpu":
        raise UserInputError(f"--runtime openvino runs on the CPU plugin only, not --provider {provider}")
    return name


def ov_compile(path: Path, *, precision_hint: str = "f32", num_threads: int | None = None):
    """``path`` (an ONNX file) compiled for OpenVINO's CPU plugin at ``precision_hint``."""
    if precision_hint not in PRECISION_HINTS:
        raise UserInputError(f"unknown OpenVINO precision hint {precision_hint!r}; "
                             f"choose one of: {', '.join(PRECISION_HINTS)}")
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path} does not exist")
    if path.suffix != ".onnx":
        raise UserInputError(f"{path} is not an .onnx file")
    ov = openvino_module()
    onnx_frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")  # no guessing other formats
    try:
        model = onnx_frontend.convert(onnx_frontend.load(str(path)))
    except Exception as err:  # openvino's GeneralFailure / OpConversionFailure derive from Exception only
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        raise UserInputError(f"OpenVINO cannot read {path}: {lines[-1] if lines else type(err).__name__}") from None
    config = {"INFERENCE_PRECISION_HINT": precision_hint}
    if num_threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    return ov.Core().compile_model(model, DEVICE, config)


def ov_runner(path: Path, *, precision_hint: str = "f32", num_threads: int | None = None):
    """A function ``x -> logits`` (float32 NCHW batch in, first output out) over one compiled model."""
    compiled = ov_compile(path, precision_hint=precision_hint, num_threads=num_threads)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        try:
            res = request.infer([np.ascontiguousarray(x, dtype=np.float32)])
        except Exception as err:  # e.g. the file's input shape is not the data's
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise UserInputError(f"OpenVINO cannot run {path} on inputs of shape {tuple(np.shape(x))}: "
                                 f"{first}") from None
        return np.array(res[output], dtype=np.float32, copy=True)
    return run


def file_runner(path: Path, runtime: str = "onnxruntime", provider: str = "cpu"):
    """``(x -> logits, backend name)`` for the ONNX file ``path`` in ``runtime``."""
    if check_runtime(runtime, provider) == "openvino":
        return ov_runner(path), f"openvino {openvino_version()}/CPU f32"
    sess = ort_session(path, provider=provider)
    return session_runner(sess), f"onnxruntime/{sess.get_providers()[0]}"


def run_runtime(runtime: str, path: Path, x: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """Logits of ``x`` through ``path`` in ``runtime`` (see RUNTIMES), ``batch`` images at a time."""
    if batch < 1:
        raise UserInputError("batch must be at least 1")
    run, _ = file_runner(path, runtime)
    return run_batches(run, x, batch).astype(np.float32)
