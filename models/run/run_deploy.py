"""The end of an ``--act-bits`` run: its deployed file written and checked (``finetune`` unless
``--no-deploy``).

The file is the one ``wnconvert export RUN --precision P`` writes (P: int8 for 5..8-bit weights,
int4 for 2..4-bit ones; for the target the run trained its placement for: ort-cpu, or openvino
after ``finetune --target openvino``), checked under the contract ``wnconvert verify`` chooses
(bit-exact for power-of-two scales, lossless-activations otherwise) on ``--samples`` validation
images (``wnconvert verify RUN`` checks it on 256), and its top-1 measured in onnxruntime on the
validation images the float network's is. Recorded in report.json as ``deployed``."""

from __future__ import annotations

from wnconvert.convert.actquant.deploy import WEIGHT_BITS
from wnconvert.convert.names import PLACEMENT_TARGETS
from wnconvert.convert.verify import VerifyConfig

from ..data.data import Preprocess
from .act_files import act_inputs, verify_act_file
from .bitexact_run import judged_bit_exact, verify_bitexact_file
from .run_export import export_precision
from .run_options import PrecisionOptions
from .rundir import RunDir


def deployed_precision(weight_bits: int) -> str:
    """The precision of an ``--act-bits`` run's deployed file: the storage of its weight grid."""
    return next(p for p, r in WEIGHT_BITS.items() if weight_bits in r)


def deploy_run(run: RunDir, preprocess: Preprocess, limit_val: int | None, samples: int) -> dict:
    """Write, check and measure the run's deployed file; the caller holds the run's write lock.
    Returns the ``deployed`` record (also written to report.json)."""
    from .run import onnx_accuracy  # run.py calls this module

    manifest = run.manifest()
    precision = deployed_precision(manifest.scheme.weight_bits)
    target = PLACEMENT_TARGETS[manifest.act.residual_conv]  # the runtime the run trained for
    entry = export_precision.__wrapped__(run.path, precision, PrecisionOptions(target=target))  # lock held
    path = run.path / entry["file"]
    x, inputs = act_inputs(manifest, None, samples, VerifyConfig(samples=samples))
    check = (verify_bitexact_file if judged_bit_exact(manifest, entry) else verify_act_file)(run.path, path, x, inputs)
    record = {"file": entry["file"], "precision": precision, "target": target, "contract": check["contract"],
              "passed": check["passed"], "failures": check["failures"], "inputs": inputs,
              "weight_bits": manifest.scheme.weight_bits, "act_bits": manifest.act.bits,
              "onnx_accuracy": onnx_accuracy(path, manifest.data, preprocess, limit_val)}
    run.update_report(lambda report: report.__setitem__("deployed", record))
    run.finish(run.manifest())
    return record


def deployed_failure(record: dict) -> str:
    return f"{record['file']} failed its {record['contract']} check: " + "; ".join(record["failures"][:3])
