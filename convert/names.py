"""The names of every choice the library accepts, as plain tuples: no torch, onnx or numpy.

The command line builds its enums (``--help`` choices, the parser's refusals) from these without
loading any heavy module, and the modules that act on a choice import its tuple from here, so
the two cannot drift. Two registries live with their implementations, because each entry there
is code: the schemes (``schemes.REGISTRY``, one Reparam class each) and the deployment targets
(``quantize.targets.PRESETS``); their names are repeated below and ``tests/test_cli_startup.py``
checks that they are equal, in order.
"""

from __future__ import annotations

# convert/schemes.py (REGISTRY's keys, in its order)
SCHEME_NAMES = ("layer-max", "channel-max", "weight-std", "weight-norm", "none")
# The one statement of which schemes have a fixed [-1, 1] range and so train on a --weight-bits grid
# (and can carry --act-bits, po2 scales, int4 files): SchemeConfig, actquant's QLayer and the
# --act-bits run checks all read it.
WEIGHT_BITS_SCHEMES = ("layer-max", "channel-max")
WEIGHT_RANGES = ("max", "learned")   # --weight-range of those schemes' grid (convert/clip.py)
GAIN_MODES = ("frozen", "learned", "none")
SCALE_GRAD_MODES = ("full", "detach")

# convert/fold.py
BN_MODES = ("keep", "fold")
GRANULARITIES = ("tensor", "channel")

# convert/quantize
PRECISIONS = ("fp32", "fp16", "int8", "int4")
VERIFY_PRECISIONS = PRECISIONS + ("qonnx",)   # verify --precision: qonnx is model.qonnx.onnx (export --target qonnx)
# weight storage of each deployed precision of an --act-bits run: int8 holds 5..8-bit grids, int4 the 2..4-bit ones
DEPLOYED_WEIGHT_BITS = {"int8": range(5, 9), "int4": range(2, 5)}
CALIBRATORS = ("minmax", "percentile", "entropy")
DEFAULT_CALIBRATOR = "minmax"
ACT_TYPES = ("uint8", "int8")
CONTAINERS = ("int4", "int8")    # storage of 4-bit values (quantize/container.py)
TARGETS = ("ort-cpu", "openvino", "tensorrt", "fixed-point", "tflite-micro", "qonnx")   # quantize/targets.py PRESETS
TFLITE_IO = ("int8", "float")   # export --target tflite-micro --io: the .tflite's input and output (convert/tflite)
DEFAULT_TARGET = "ort-cpu"
# export --target: the int8 .tflite compiled by Arm's Vela for these Ethos-U configurations (convert/ethosu.py)
ETHOS_U_TARGETS = ("ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u85-256")
RESIDUAL_CONV = ("quantized", "float")  # a conv output read only by a residual add (quantize/placement.py)
# finetune --target (--act-bits runs): the runtime whose placement the network is trained for -> it
TRAIN_PLACEMENTS = {"ort-cpu": "quantized", "openvino": "float"}
PLACEMENT_TARGETS = {placement: target for target, placement in TRAIN_PLACEMENTS.items()}  # and back

# convert/actquant
SCALE_FORMATS = ("float", "po2")
RANGE_MODES = ("learned", "frozen")
ROUNDINGS = ("onnx", "tflite")   # finetune --rounding: eval-mode requantization (actquant/tflite_points.py)

# convert/runtime.py, convert/openvino_rt.py
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
RUNTIMES = ("onnxruntime", "openvino")
TFLITE_RUNTIMES = ("tflite-micro", "litert")   # eval of a .tflite file (convert/tflite_eval.py)
