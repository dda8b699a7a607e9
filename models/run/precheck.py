"""Refusals that a command's options and the run's manifest decide, made before torch, onnx, the
data or the model load (issue 21): ``export``, ``verify``, ``golden`` and ``eval`` call these first,
from the command body, and the library functions behind them call the same ones, so the message
is one and the same whichever path reaches it.

Nothing here imports torch, onnx or numpy: the manifest is read as JSON, a deployment target as
the few facts a refusal needs (:data:`TARGET_TAKES`, equal to ``convert/quantize/targets.py``'s
presets: tests/test_precheck.py checks it). A manifest this module cannot make sense of is left to
the full reader (``RunDir.manifest``), which says what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path

from wnconvert.convert.artifacts import read_json
from wnconvert.convert.errors import UserInputError
from wnconvert.convert.names import CONTAINERS, ETHOS_U_TARGETS, PRECISIONS
from wnconvert.convert.names import DEPLOYED_WEIGHT_BITS as WEIGHT_BITS

from ..files import MANIFEST, ONNX, QONNX, TFLITE, artifact_name
from .lock import check_unlocked
from .run_options import CALIB_SPLITS, PrecisionOptions

GOLDEN_PRECISIONS = ("int8", "int4", "tflite", "qonnx")
MAX_GOLDEN_COUNT = 1024  # images per golden call (README)
# target -> (precisions, takes weights-only int8/int4 files, what it does with an --act-bits run's
# file: trained | po2 | refused); convert/quantize/targets.py PRESETS
TARGET_TAKES = {
    "ort-cpu": (("fp32", "fp16", "int8", "int4"), True, "trained"),
    "openvino": (("fp32", "fp16", "int8", "int4"), True, "trained"),
    "tensorrt": (("fp32", "fp16", "int8"), False, "refused"),
    "fixed-point": (("int8", "int4"), True, "po2"),
    "tflite-micro": (("int8",), False, "trained"),
    "qonnx": ((), False, "trained"),
}


def check_not_busy(run_dir: Path) -> None:
    """``export`` and ``verify`` (commands) refuse first a run another process is writing, naming
    that process (they take no --out, so the message offers none). Library calls made while this
    process holds the lock (finetune's own deployed file) do not come here."""
    if Path(run_dir).is_dir():
        check_unlocked(Path(run_dir), "")


def manifest_of(run_dir: Path) -> dict:
    """The run's manifest.json as a dict; refuses, like ``RunDir.manifest``, a path that is not a run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserInputError(f"{path} is not a run directory")
    if not (path / MANIFEST).exists():
        raise UserInputError(f"{path} has no {MANIFEST}; is it a wnconvert run directory?")
    d = read_json(path / MANIFEST)
    return d if isinstance(d, dict) else {}


def _act_bits_trained(manifest: dict) -> int | None:
    act = manifest.get("act")
    bits = act.get("bits") if isinstance(act, dict) else None
    return bits if isinstance(bits, int) else None


def _weight_bits(manifest: dict) -> int | None:
    scheme = manifest.get("scheme")
    bits = scheme.get("weight_bits") if isinstance(scheme, dict) else None
    return bits if isinstance(bits, int) else None


def _po2(manifest: dict) -> bool:
    act = manifest.get("act")
    return isinstance(act, dict) and act.get("scale_format") == "po2"


def parse_act_bits(value: str | None, precision: str) -> int | None:
    """``--act-bits``: 8 | float (None: 8 for int8, float otherwise)."""
    if value is None:
        return 8 if precision == "int8" else None
    v = value.strip().lower()
    if v in ("float", "fp32", "none", "0"):
        return None
    if v in ("8", "int8"):
        return 8
    raise UserInputError(f"--act-bits must be 8 or float, not {value!r}")


def check_container_use(precision: str, container: str | None) -> None:
    """``--container`` names the storage of 4-bit values: only int4 files have any."""
    if container is not None:
        if container not in CONTAINERS:
            raise UserInputError(f"unknown container {container!r}; choose one of: {', '.join(CONTAINERS)}")
        if precision != "int4":
            raise UserInputError(f"--container stores the 4-bit values of int4 files; --precision {precision} "
                                 "has none (leave it out)")


def check_act_values(weight_bits: int, act_bits_trained: int, precision: str, act_bits: str | None,
                     data: str | None) -> None:
    """Refuse an --act-bits run's export that does not match what the run trained (one line, exit 2)."""
    if precision not in WEIGHT_BITS:
        raise UserInputError(f"an --act-bits run exports its trained network at int8 or int4, not {precision}")
    if weight_bits not in WEIGHT_BITS[precision]:
        want = "int4" if weight_bits <= 4 else "int8"
        raise UserInputError(f"this run trained {weight_bits}-bit weights: export it with --precision {want}, "
                             f"not {precision}")
    if act_bits is not None and act_bits.strip().lower() not in (str(act_bits_trained), f"int{act_bits_trained}"):
        raise UserInputError(f"this run trained {act_bits_trained}-bit activations; --act-bits {act_bits} "
                             "does not match (leave it out)")
    if data:
        raise UserInputError("an --act-bits run exports its trained activation scales; it takes no "
                             "calibration --data")


def check_target(target: str, precisions, takes_weights_only: bool, act_runs: str, precision: str,
                 act_run: bool, po2: bool, weights_only: bool) -> None:
    """Refuse, in one line, a file the target cannot take from this run (``act_run``: trained with
    --act-bits; ``po2``: with power-of-two scales; ``weights_only``: float activations)."""
    act_file = act_run and precision != "fp16"
    if act_runs == "po2" and not po2:
        how = "without --act-bits" if not act_run else "with float activation scales"
        raise UserInputError(f"--target {target} needs a run trained with power-of-two activation "
                             "scales (finetune --act-bits A --weight-bits B --scale-format po2); this run was "
                             f"trained {how}")
    if precision not in precisions:
        raise UserInputError(f"--target {target} takes --precision {' | '.join(precisions)}, not {precision}")
    if weights_only and not act_file and not takes_weights_only and precision in ("int8", "int4"):
        raise UserInputError(f"--target {target} quantizes activations too (explicit int8 Q/DQ); "
                             "--act-bits float (weights only) is not one of its files")
    if act_file and act_runs == "refused":
        raise UserInputError(f"--target {target}: an --act-bits run's file keeps its trained "
                             "integers (unsigned activations, int32 biases), which this target does not "
                             "take; export it with --target ort-cpu or openvino")


def check_export(run_dir: Path, precision: str, opts: PrecisionOptions) -> None:
    """Every refusal of ``export RUN [--precision P]`` the options and the manifest decide."""
    check_container_use(precision, opts.container)
    manifest = manifest_of(run_dir)
    act_trained = _act_bits_trained(manifest)
    act_file = manifest.get("act") is not None and precision != "fp16"
    if precision == "fp32":
        weights_only = False
    else:
        weights_only = not act_file and parse_act_bits(opts.act_bits, precision) is None
    if opts.target in TARGET_TAKES:
        check_target(opts.target, *TARGET_TAKES[opts.target], precision, manifest.get("act") is not None,
                     _po2(manifest), weights_only)
    if precision == "fp32":
        return
    if act_file:
        if act_trained is not None and _weight_bits(manifest) is not None:
            check_act_values(_weight_bits(manifest), act_trained, precision, opts.act_bits, opts.data)
        return
    if not (Path(run_dir) / ONNX).exists():
        raise UserInputError(f"{run_dir} has no model.onnx; run `wnconvert export {run_dir}` first")
    if precision in ("int8", "int4") and parse_act_bits(opts.act_bits, precision) is not None:
        check_calibration(precision, opts.data or manifest.get("data"), opts)


def check_calibration(precision: str, data: str | None, opts: PrecisionOptions) -> None:
    """A file with quantized activations needs calibration images: data, and at least one."""
    if not data:
        raise UserInputError(f"--precision {precision} quantizes activations and needs calibration "
                             "data; the run was trained without --data: pass --data SPEC "
                             "(or --act-bits float for weights only)")
    if opts.calib_samples < 1:
        raise UserInputError("--calib-samples must be at least 1")
    if opts.calib_split not in CALIB_SPLITS:
        raise UserInputError(f"--calib-split must be train or val, not {opts.calib_split!r}")


def deployed_files(run_dir: Path) -> list[Path]:
    """The run's deployed files other than model.onnx that ``verify RUN`` checks: every
    ``model.<precision>.onnx``, model.qonnx.onnx and model.int8.tflite present."""
    names = [artifact_name(p) for p in PRECISIONS if p != "fp32"] + [QONNX, TFLITE]
    return [Path(run_dir) / n for n in names if (Path(run_dir) / n).is_file()]


def verify_paths(run_dir: Path, onnx_file: Path | None, precision: str | None) -> Path | None:
    """The file ``verify`` starts from: ``--onnx F``, ``--precision P``'s file (``qonnx``:
    model.qonnx.onnx) or model.onnx; None when no option names a file and the run has no
    model.onnx but other deployed files (``verify RUN`` then checks those). Refuses both options
    given or a missing file."""
    if onnx_file is not None and precision is not None:
        raise UserInputError("give --onnx or --precision, not both")
    if onnx_file is not None:
        if not onnx_file.exists():
            raise UserInputError(f"{onnx_file} does not exist")
        return onnx_file
    path = Path(run_dir) / (QONNX if precision == "qonnx" else artifact_name(precision or "fp32"))
    if not path.exists():
        if precision is None and deployed_files(run_dir):
            return None
        how = ("" if precision in (None, "fp32") else " --target qonnx" if precision == "qonnx"
               else f" --precision {precision}")
        raise UserInputError(f"{path} does not exist; run `wnconvert export {run_dir}{how}` first")
    return path


def check_verify(run_dir: Path, onnx_file: Path | None, precision: str | None,
                 tflite: Path | None = None) -> None:
    """The refusals of ``verify RUN`` decided before anything loads (``--tflite F``: that file alone)."""
    manifest_of(run_dir)
    if tflite is not None:
        if onnx_file is not None or precision is not None:
            raise UserInputError("give --tflite alone, not with --onnx or --precision")
        if not Path(tflite).exists():
            raise UserInputError(f"{tflite} does not exist")
        return
    verify_paths(run_dir, onnx_file, precision)


def check_golden(run_dir: Path, out: Path, data: str | None, count: int, precision: str,
                 onnx_file: Path | None) -> tuple[Path, str]:
    """The refusals of ``golden RUN``; returns the QDQ file and the data spec it runs on."""
    if not 1 <= count <= MAX_GOLDEN_COUNT:
        raise UserInputError(f"--count must be between 1 and {MAX_GOLDEN_COUNT} (the integer reference "
                             "holds every tensor of every image in memory)")
    if precision not in GOLDEN_PRECISIONS:
        raise UserInputError(f"--precision must be one of {', '.join(GOLDEN_PRECISIONS)}, not {precision!r}")
    if Path(out).resolve() == Path(run_dir).resolve():
        raise UserInputError("--out must be a folder of its own, not the run directory")
    if (Path(out) / MANIFEST).exists():
        raise UserInputError(f"--out {out} is a run directory (it holds {MANIFEST}); golden vectors go "
                             "into a folder of their own")
    manifest = manifest_of(run_dir)
    own = Path(run_dir) / (TFLITE if precision == "tflite" else QONNX if precision == "qonnx"
                           else artifact_name(precision))
    path = Path(onnx_file) if onnx_file is not None else own
    if not path.is_file():
        how = {"tflite": "--target tflite-micro", "qonnx": "--target qonnx"}.get(precision, f"--precision {precision}")
        hint = "" if onnx_file is not None else f"; run `wnconvert export {run_dir} {how}` first"
        raise UserInputError(f"{path} does not exist{hint}")
    spec = data or manifest.get("data")
    if not spec:
        raise UserInputError(f"{run_dir} was made without --data: give the images with --data SPEC")
    if Path(out).resolve() == Path(run_dir).resolve():
        raise UserInputError("--out must be a folder of its own, not the run directory")
    return path, spec


def check_eval(artifact: Path, provider: str, batch: int) -> None:
    """The refusals of ``eval ARTIFACT`` decided before anything loads."""
    if not Path(artifact).exists():
        raise UserInputError(f"{artifact} does not exist")
    if provider not in ("cpu", "cuda"):
        raise UserInputError(f"unknown provider {provider!r}; choose cpu or cuda")
    if batch < 1:
        raise UserInputError("--batch-size must be at least 1")


def check_qonnx_values(act_run: bool, given: list[str]) -> None:
    """``--target qonnx``: options that do not apply, or a run without --act-bits (one line, exit 2)."""
    if given:
        raise UserInputError(f"--target qonnx writes {QONNX} from the run's trained network; "
                             f"{given[0]} does not apply to it (leave it out)")
    if not act_run:
        raise UserInputError("--target qonnx writes the trained integer network of an --act-bits run; this run "
                             "was trained without --act-bits (finetune --weight-bits B --act-bits A)")


def check_tflite_act(weight_bits: int | None, act_bits: int | None, mixed_precision: bool,
                     residual_conv: str) -> None:
    """``--target tflite-micro`` of an --act-bits run: int8 weights and activations, no float islands,
    the trained placement onnxruntime's (one line, exit 2)."""
    if act_bits != 8 or weight_bits is None or weight_bits < 5:
        raise UserInputError(f"--target tflite-micro writes int8 weights and activations; this run trained "
                             f"W{weight_bits}A{act_bits} (train --weight-bits 8 --act-bits 8, or export an fp32 run)")
    if mixed_precision:
        raise UserInputError("--target tflite-micro: this run keeps float operations between its integer "
                             "layers (--mixed-precision); TensorFlow Lite Micro's int8 file has no float islands")
    if residual_conv != "quantized":
        raise UserInputError("--target tflite-micro: this run was trained for OpenVINO's placement (float convs "
                             "before the residual adds); train with finetune --target ort-cpu")


def check_tflite_calibration(opts: PrecisionOptions) -> None:
    """``--target tflite-micro`` of an fp32 run: TFLite's int8 scheme leaves no choice of activations."""
    if opts.act_bits is not None and opts.act_bits.strip().lower() not in ("8", "int8"):
        raise UserInputError(f"--target tflite-micro quantizes activations to int8; --act-bits {opts.act_bits} "
                             "does not fit (leave it out)")
    if opts.act_type not in (None, "int8") or opts.per_channel is False:
        raise UserInputError("--target tflite-micro takes int8 activations and per-channel weights; leave "
                             "--act-type and --per-tensor out")


def check_tflite_export(run_dir: Path, opts: PrecisionOptions) -> None:
    """Every refusal of ``export RUN --target tflite-micro`` the options and the manifest decide."""
    manifest = manifest_of(run_dir)
    act = manifest.get("act")
    if isinstance(act, dict):
        check_tflite_act(_weight_bits(manifest), _act_bits_trained(manifest), bool(act.get("mixed_precision")),
                         act.get("residual_conv") or "quantized")
        if opts.data:
            raise UserInputError("an --act-bits run exports its trained activation scales; it takes no "
                                 "calibration --data")
        return
    check_tflite_calibration(opts)
    if not (Path(run_dir) / ONNX).exists():
        raise UserInputError(f"{run_dir} has no model.onnx; run `wnconvert export {run_dir}` first")
    if not (opts.data or manifest.get("data")):
        raise UserInputError("--target tflite-micro calibrates the int8 activations of an fp32 run; the run was "
                             "trained without --data: pass --data SPEC")
    check_calibration("int8", opts.data or manifest.get("data"), opts)


def check_ethos_u_request(target: str, precision: str) -> None:
    """``--target ethos-u*`` compiles the run's int8 .tflite: no other precision."""
    if target not in ETHOS_U_TARGETS:
        raise UserInputError(f"unknown Ethos-U target {target!r}; choose one of: {', '.join(ETHOS_U_TARGETS)}")
    if precision not in ("fp32", "int8"):  # fp32 is export's default: the option left out
        raise UserInputError(f"--target {target} compiles the run's int8 .tflite; --precision {precision} is refused"
                             + (" (Vela crashes on INT4 weights)" if precision == "int4" else ""))


def check_ethos_u_export(run_dir: Path, target: str, precision: str) -> None:
    """Every refusal of ``export RUN --target ethos-u*`` the options and the run's files decide."""
    check_ethos_u_request(target, precision)
    manifest_of(run_dir)
    if not (Path(run_dir) / TFLITE).is_file():
        raise UserInputError(f"{Path(run_dir)} has no {TFLITE}: write it first with "
                             f"`wnconvert export {Path(run_dir)} --target tflite-micro`")
