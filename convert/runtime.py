"""onnxruntime sessions and batched inference: the one place ONNX files are run (verify, quantize,
eval, report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserInputError
from .names import PROVIDERS
from .onnx_files import check_external_data

# onnxruntime (ENABLE_EXTENDED and up) rewrites ``DequantizeLinear(int4/int8) -> MatMul`` into
# ``MatMulNBits``, whose default accuracy level quantizes the *activations* to int8 and would make
# lossless weights look lossy. Every session here computes it in float; deployments wanting
# bit-exact weights-only results set the same option. It changes nothing else.
MATMULNBITS_EXACT = ("session.qdq_matmulnbits_accuracy_level", "0")


def ort_session(path: Path, optimized: bool = True, provider: str = "cpu"):
    """An onnxruntime session on ``provider`` (cpu | cuda; cuda falls back to the CPU for the
    nodes it lacks). Its worker threads do not spin-wait: on a machine shared with other work
    (CI, a training job) spinning threads slow every run down many times over."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UserInputError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise UserInputError(f"onnxruntime {ort.__version__} here has no {PROVIDERS[provider]} "
                             "(install onnxruntime-gpu for --provider cuda)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.add_session_config_entry(*MATMULNBITS_EXACT)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    check_external_data(path)
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime's own exception types: a file it cannot load
        raise UserInputError(f"onnxruntime cannot load {path}: {_first_line(e)}") from None
    if sess.get_providers()[0] != PROVIDERS[provider]:  # onnxruntime falls back silently
        raise UserInputError(f"onnxruntime could not start {PROVIDERS[provider]} for {path} "
                             "(CUDA/cuDNN libraries missing?)")
    return sess


def session_runner(sess):
    """``x -> logits`` of a session's first input and output, fed float32 NCHW."""
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        except Exception as e:  # e.g. the file's input shape is not the data's
            raise UserInputError(f"onnxruntime cannot run {getattr(sess, '_model_path', 'the ONNX file')} "
                                 f"on inputs of shape {tuple(np.shape(x))}: {_first_line(e)}") from None

    return run


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def run_batches(fn, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """``fn`` over ``x`` in slices of ``batch``, the outputs concatenated."""
    if len(x) <= batch:
        return fn(x)
    return np.concatenate([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def run_onnx(path: Path, x: np.ndarray, *, optimized: bool = True, batch: int = 64,
             provider: str = "cpu") -> np.ndarray:
    """The first output of the ONNX file ``path`` on ``x`` (NCHW float32), in batches."""
    return run_batches(session_runner(ort_session(path, optimized, provider)), x, batch)
