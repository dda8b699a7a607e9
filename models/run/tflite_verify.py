"""``verify`` of a run's .tflite: TensorFlow Lite Micro is the deployed runtime, checked against
the integer reference in TFLite's arithmetic and against the trained network.

The checks, in order (the run's hashes are checked before, as for every artifact):

1. **constants**: every weight and bias of the file equals, tensor by tensor, the integers of the
   run's int8 network translated again (a weight moved by one step is named; exit 3);
2. **TFLite Micro = reference**: every tensor TFLite Micro holds (``kPreserveAllTensors``) equals
   :mod:`wnconvert.convert.tflite.reference`'s, image by image; the first differing tensor is named;
3. **LiteRT BUILTIN_REF = TFLite Micro** on every tensor (``experimental_preserve_all_tensors``),
   except FULLY_CONNECTED outputs: LiteRT's per-channel kernel rounds once (``TFLITE_SINGLE_ROUNDING``)
   where TFLite Micro rounds twice, so each of its FC outputs must equal that single-rounding
   arithmetic on its own input (:func:`reference.litert_fully_connected`), the steps from TFLite
   Micro counted; LiteRT's default resolver (XNNPACK) is *counted*: elements one step or more away,
   per tensor;
4. **one step from the trained network**: each tensor of the file is recomputed by the run's own
   integer network (the QDQ file ``verify`` proves equal to the trained model; integer
   reference of :mod:`wnconvert.convert.intref`) from TFLite's inputs to that operator: at most
   one step apart (double rounding, ADD's per-input rescaling), those elements counted per tensor;
5. **top-1 outside a derived margin**: end to end, on each image, every logit of the file is within
   ``B`` steps of the trained network's, ``B`` the largest change the last layer's output can
   undergo from its input's measured deviation ``Δx`` on that image (a fully connected layer:
   ``B = max_o Σ_k |w_ok|·|Δx_k| · s_x·s_w,o / s_y + 1``, the one for its own rounding); so the
   two top-1 agree on every image whose top-1 margin exceeds ``2·B``, and that is checked too.

The contract is named ``tflite-one-step``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wnconvert.convert.errors import UserInputError
from wnconvert.convert.intref import run_integer
from wnconvert.convert.intref.execute import requantize_accum
from wnconvert.convert.intref.graph import read_steps
from wnconvert.convert.intref.ops import evaluate, move
from wnconvert.convert.tflite import reference
from wnconvert.convert.tflite.flatbuf import TFModel, parse, read_file
from wnconvert.convert.tflite.writer import Held, Writer

from .run_tflite import recorded_options, source_network
from .rundir import RunDir

CONTRACT = "tflite-one-step"


def load_tflite(path: Path) -> TFModel:
    """Read and parse a .tflite (one line, exit 2, for a missing, truncated or crafted file)."""
    return parse(read_file(path), label=str(path))


def _relayout(values: np.ndarray, held: Held, to_onnx: bool) -> np.ndarray:
    """TFLite int8 values (NHWC or flat) as the ONNX integer tensor they stand for (``to_onnx``),
    or an ONNX integer tensor as the TFLite values standing for it."""
    v = np.asarray(values, np.int64) + (held.offset if to_onnx else -held.offset)
    perm = (0, 3, 1, 2) if to_onnx else (0, 2, 3, 1)
    if held.layout == "nhwc" and v.ndim == 4:
        return v.transpose(perm)
    if held.layout == "flat_nhwc":
        c, h, w = held.chw
        return v.reshape(len(v), *((h, w, c) if to_onnx else (c, h, w))).transpose(perm).reshape(len(v), -1)
    return v


def _to_onnx(values: np.ndarray, held: Held) -> np.ndarray:
    return _relayout(values, held, to_onnx=True)


def _from_onnx(values: np.ndarray, held: Held) -> np.ndarray:
    return _relayout(values, held, to_onnx=False)


def check_constants(got: TFModel, expected: TFModel) -> list[str]:
    """Failures where the file's structure or constants differ from the run's network."""
    if [o.op for o in got.ops] != [o.op for o in expected.ops] or len(got.tensors) != len(expected.tensors):
        return ["the file's operators are not those of the run's int8 network (another model, or edited)"]
    for a, b in zip(got.tensors, expected.tensors):
        if b.data is None:
            continue
        if a.data is None or a.data.shape != b.data.shape:
            return [f"tensor '{b.name}' is missing or has another shape than the run's"]
        n = int(np.count_nonzero(a.data.astype(np.int64) != b.data.astype(np.int64)))
        if n:
            return [f"tensor '{b.name}' differs from the run's trained integers in {n} of {a.data.size} elements"]
        if b.quantized and (not a.quantized or not np.array_equal(a.scale, b.scale)
                            or not np.array_equal(a.zero_point, b.zero_point)):
            return [f"tensor '{b.name}' has other quantization parameters than the run's"]
    return []


def _runtimes():
    """TensorFlow Lite Micro's and LiteRT's Python interpreters, or one line naming them."""
    try:
        from ai_edge_litert import interpreter
        from tflite_micro import runtime
    except ImportError:
        raise UserInputError("verify of a .tflite runs TensorFlow Lite Micro and LiteRT: pip install "
                             "tflite-micro ai-edge-litert (both in wnconvert's test extra)") from None
    return runtime, interpreter


def _micro(data: bytes, x: np.ndarray, model: TFModel) -> dict[int, np.ndarray]:
    runtime, _ = _runtimes()

    it = runtime.Interpreter.from_bytes(data, intrepreter_config=runtime.InterpreterConfig.kPreserveAllTensors)
    wanted = [i for i, t in enumerate(model.tensors) if t.data is None]
    out: dict[int, list] = {i: [] for i in wanted}
    for img in x:
        it.set_input(img[None], 0)
        it.invoke()
        for i in wanted:
            out[i].append(np.array(it.GetTensor(i, 0)["tensor_data"]))
        it.reset()
    return {i: np.concatenate(v) for i, v in out.items()}


def _litert(data: bytes, x: np.ndarray, model: TFModel, ref: bool) -> dict[int, np.ndarray]:
    _, interpreter = _runtimes()
    Interpreter, OpResolverType = interpreter.Interpreter, interpreter.OpResolverType
    kind = OpResolverType.BUILTIN_REF if ref else OpResolverType.AUTO
    it = Interpreter(model_content=data, experimental_op_resolver_type=kind,
                     experimental_preserve_all_tensors=ref, num_threads=1)
    it.allocate_tensors()
    wanted = [i for i, t in enumerate(model.tensors) if t.data is None] if ref else list(model.outputs)
    out: dict[int, list] = {i: [] for i in wanted}
    for img in x:
        it.set_tensor(model.inputs[0], img[None])
        it.invoke()
        for i in wanted:
            out[i].append(np.array(it.get_tensor(i)))
    return {i: np.concatenate(v) for i, v in out.items()}


def _first_difference(model: TFModel, a: dict[int, np.ndarray], b: dict[int, np.ndarray], what: str) -> list[str]:
    for op in model.ops:  # graph order
        for i in op.outputs:
            if i in a and i in b:
                x, y = np.asarray(a[i]), np.asarray(b[i])
                y = y.reshape(x.shape) if y.size == x.size else y
                if x.shape != y.shape or not np.array_equal(x, y):
                    n = x.size if x.shape != y.shape else int(np.count_nonzero(x != y))
                    return [f"{what}: tensor '{model.tensors[i].name}' ({op.op}) differs in {n} of {x.size} elements"]
    return []


def _count_steps(model: TFModel, a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> dict[str, dict]:
    out = {}
    for i, theirs in b.items():
        d = np.abs(np.asarray(a[i], np.float64).reshape(-1) - np.asarray(theirs, np.float64).reshape(-1))
        out[model.tensors[i].name] = {"elements": int(d.size), "differ": int(np.count_nonzero(d)),
                                      "max_steps": float(d.max()) if d.size else 0.0}
    return out


def local_model_check(source, writer: Writer, env: dict[int, np.ndarray]) -> tuple[dict, list[str]]:
    """Step 4 of the module docstring: per tensor, elements one step off and the largest gap."""
    counts, failures = {}, []
    for step in read_steps(source):
        if step.kind not in ("requant", "move") or step.out not in writer.held:
            continue
        names = ([n for n in step.core.input] if step.kind == "move" and step.op == "Concat" else
                 [step.source] if step.kind == "move" else [o.tensor for o in step.operands if o.const is None])
        local = {n: _to_onnx(env[writer.held[n].index], writer.held[n]) for n in names}
        if step.kind == "move":
            want = move(step, local)
        else:
            want, _ = requantize_accum(evaluate(step, local), step.out_params, step.clamp)
        held = writer.held[step.out]
        got = _to_onnx(env[held.index], held)
        d = np.abs(got - np.asarray(want, np.int64).reshape(got.shape))
        counts[step.out] = {"elements": int(d.size), "one_step": int(np.count_nonzero(d == 1)),
                            "max_steps": int(d.max()) if d.size else 0}
        if d.size and d.max() > 1 and not failures:
            failures.append(f"tensor '{step.out}' ({step.op} '{step.node}') is {int(d.max())} steps from the "
                            f"trained network recomputed on TFLite's inputs ({int(np.count_nonzero(d > 1))} elements)")
    return counts, failures


def output_name(model: TFModel) -> str:
    """The int8 logits tensor (before the DEQUANTIZE of ``--io float``)."""
    idx = model.outputs[0]
    if model.tensors[idx].dtype == "float32":
        idx = next(op.inputs[0] for op in model.ops if op.outputs[0] == idx)
    return model.tensors[idx].name


def _last_layer_bound(source, writer: Writer, model_run, env, out_name: str) -> tuple[np.ndarray, str]:
    """``B`` of the module docstring per image, with what it was derived from: for a fully
    connected last layer ``max_o Σ_k |w_ok|·|Δx_k| · s_x·s_w,o / s_y + 1`` from the image's own
    input deviations ``Δx`` (a bound on how far its output can move), else ``D · Σ s_in / s_y + 1``."""
    n = len(model_run.tensors[out_name].values)
    last = next((s for s in read_steps(source) if s.out == out_name), None)
    if last is None or last.kind != "requant":
        return np.ones(n), "output not requantized"
    ins = [o for o in last.operands if o.const is None]
    devs = []
    for o in ins:
        held = writer.held[o.tensor]
        devs.append(np.abs(_to_onnx(env[held.index], held) - np.asarray(model_run.tensors[o.tensor].values, np.int64)))
    s_y = float(last.out_params.scale)
    if last.op in ("Gemm", "MatMul") and last.operands[1].const is not None:
        w = np.abs(last.operands[1].const.astype(np.float64))
        w = w if last.op == "Gemm" and last.attrs.get("transB", 0) else w.T  # [out, in]
        s_w = np.broadcast_to(np.asarray(last.operands[1].params.scale, np.float64).reshape(-1), (w.shape[0],))
        m = float(ins[0].params.scale) * s_w / s_y
        bound = (devs[0].reshape(n, -1).astype(np.float64) @ w.T * m).max(axis=1) + 1.0
        return bound, f"{last.op} '{last.node}': its weights times each image's input deviation"
    dev = np.max([d.reshape(n, -1).max(axis=1) for d in devs], axis=0)
    return dev * sum(float(o.params.scale) for o in ins) / s_y + 1.0, f"{last.op} '{last.node}': input deviation"


def verify_tflite_file(run_dir: Path, path: Path, x: np.ndarray, inputs: str) -> dict:
    """All five checks of the module docstring on ``x`` (normalized NCHW float images)."""
    run = RunDir(run_dir)
    data = read_file(path)
    model = parse(data, label=str(path))
    opts, io = recorded_options(run.manifest())
    source, _ = source_network(run, opts)
    writer = Writer(source, io)
    expected = writer.translate()
    _runtimes()
    failures = check_constants(model, expected)
    res: dict = {"contract": CONTRACT, "file": str(path), "inputs": inputs, "io": io}
    if failures:
        return res | {"passed": False, "failures": failures}
    model_run = run_integer(source, x)
    x_in = np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1)) if io == "float" else \
        _from_onnx(model_run.tensors[model_run.input_name].values, writer.held[model_run.input_name]).astype(np.int8)
    env = reference.run(model, x_in)
    acts = {i: v for i, v in env.items() if model.tensors[i].data is None and i not in model.inputs}
    micro = _micro(data, x_in, model)
    failures += _first_difference(model, acts, micro, "TensorFlow Lite Micro and the integer reference")
    lite_ref = _litert(data, x_in, model, ref=True)
    # LiteRT's reference FULLY_CONNECTED with per-channel weights rounds once (TFLITE_SINGLE_ROUNDING),
    # TensorFlow Lite Micro twice: one step apart on a few outputs in 10^4. Each FC output of LiteRT must
    # equal that arithmetic on LiteRT's own input (the steps from TFLite Micro counted); every other
    # tensor must equal TensorFlow Lite Micro's
    fc_outputs = {op.outputs[0] for op in model.ops if op.op == "FULLY_CONNECTED"}
    fc_counts = _count_steps(model, micro, {i: lite_ref[i] for i in fc_outputs if i in lite_ref})
    failures += _first_difference(model, micro, {i: v for i, v in lite_ref.items() if i not in fc_outputs},
                                  "LiteRT BUILTIN_REF and TensorFlow Lite Micro")
    failures += _first_difference(model, reference.litert_fully_connected(model, lite_ref),
                                  {i: lite_ref[i] for i in fc_outputs if i in lite_ref},
                                  "LiteRT BUILTIN_REF and its single-rounding FULLY_CONNECTED")
    xnnpack = _count_steps(model, micro, _litert(data, x_in, model, ref=False))
    counts, local_failures = local_model_check(source, writer, env)
    failures += local_failures
    bit_exact = None
    act = run.manifest().act
    if act is not None and act.rounding == "tflite":  # trained = TFLite Micro at every point (tflite_bitexact.py)
        from .tflite_bitexact import trained_equals_micro
        bit_exact = trained_equals_micro(run.load_qat()[1], x, micro, writer, model_run, _to_onnx)
        failures += bit_exact["failures"]
    name = output_name(expected)
    bound, derived = _last_layer_bound(source, writer, model_run, env, name)
    out_held = writer.held[name]
    ours = _to_onnx(env[out_held.index], out_held).reshape(len(x), -1)
    theirs = np.asarray(model_run.tensors[name].values, np.int64).reshape(len(x), -1)
    top_t, top_m = ours.argmax(1), theirs.argmax(1)
    srt = np.sort(theirs, axis=1)
    margins = srt[:, -1] - srt[:, -2] if theirs.shape[1] > 1 else np.full(len(x), np.inf)
    beyond = np.abs(ours - theirs) > bound[:, None]
    if beyond.any():
        failures.append(f"logits '{name}' move {int(np.abs(ours - theirs)[beyond].max())} steps from the trained "
                        f"network's, beyond the bound B its last layer allows ({derived})")
    bad = np.flatnonzero((top_t != top_m) & (margins > 2 * bound))
    if bad.size:
        failures.append(f"top-1 differs from the trained network's on {bad.size} image(s) whose margin exceeds "
                        f"2·B steps (B from {derived})")
    return res | {
        "passed": not failures, "failures": failures,
        "micro_equals_reference": not any("TensorFlow Lite Micro and the integer reference" in f for f in failures),
        "litert_ref_equals_micro": not any("LiteRT BUILTIN_REF" in f for f in failures),
        "litert_ref_fully_connected": fc_counts,
        "xnnpack": {"differing_elements": sum(v["differ"] for v in xnnpack.values()), "tensors": xnnpack},
        "one_step": {"elements": sum(v["one_step"] for v in counts.values()),
                     "of": sum(v["elements"] for v in counts.values()), "tensors": counts},
        "top1": {"agreement": float(np.mean(top_t == top_m)), "images": len(x),
                 "margin_steps": {"median": float(np.median(2 * bound)), "max": float(np.max(2 * bound))},
                 "derived_from": derived, "disagreements_within_margin": int(np.sum(top_t != top_m)) - int(bad.size)},
    } | ({"bit_exact": bit_exact} if bit_exact is not None else {})


def tflite_files(run_dir: Path, given: Path | None) -> list[Path]:
    """The .tflite files ``verify`` checks: ``--tflite F``, else the run's model.int8.tflite if present."""
    if given is not None:
        if not Path(given).is_file():
            raise UserInputError(f"{given} does not exist")
        return [Path(given)]
    from .run_tflite import TFLITE_FILE

    own = Path(run_dir) / TFLITE_FILE
    return [own] if own.is_file() else []
