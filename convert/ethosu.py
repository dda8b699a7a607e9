"""Arm Ethos-U: an int8 .tflite compiled by Arm's Vela (``ethos-u-vela``, the ``npu`` extra).

:func:`compile_tflite` runs Vela in a child process (it can die on a signal: Vela 5.2 crashes with a
floating point exception on INT4 weights, which is why those are refused before it runs) for one
accelerator configuration, with the system configuration and memory mode named in
:data:`VELA_SYSTEMS` (Vela's own ``Arm/vela.ini``), and returns Vela's figures: operators on the NPU
and the ones left to the CPU (named, read from the compiled file: every operator that is not
Vela's ``ethos-u`` custom operator runs on the Cortex-M), SRAM and flash (or DRAM) used, estimated
NPU and total cycles, inference time and inferences/s at the configuration's clock.

Torch-free: the file is read with the ``tflite`` schema bindings.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import UserInputError, WnError
from .names import ETHOS_U_TARGETS


class ExportError(WnError):
    """Vela failed (exit 6, as every failed export; convert/export.py's ExportError loads torch)."""

    exit_code = 6

# target -> (Vela system configuration, memory mode), both from Vela's Arm/vela.ini
VELA_SYSTEMS = {
    "ethos-u55-128": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u55-256": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u65-256": ("Ethos_U65_High_End", "Dedicated_Sram_384KB"),
    "ethos-u85-256": ("Ethos_U85_SYS_DRAM_High", "Dedicated_Sram_384KB"),
}
INSTALL = "pip install 'wnconvert[npu]'"
NPU_OP = "ethos-u"
VELA_TIMEOUT = 600


def require_vela() -> None:
    """One line naming the extra when Vela is not installed."""
    try:
        found = all(sys.modules.get(m, True) is not None for m in ("ethosu", "ethosu.vela")) and \
            importlib.util.find_spec("ethosu.vela") is not None
    except (ImportError, ValueError, AttributeError):
        found = False
    if not found:
        raise UserInputError(f"the Ethos-U targets compile with Arm's Vela, which is not installed: {INSTALL}")


def _op_names() -> dict[int, str]:
    import tflite
    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if isinstance(v, int) and not k.startswith("_")}


def read_ops(data: bytes, where: str) -> tuple[list[str], list[str]]:
    """``(operator names in order, tensor types used)`` of a .tflite; a file the schema cannot
    read is one UserInputError line."""
    import tflite

    names, types = _op_names(), {v: k for k, v in vars(tflite.TensorType).items() if isinstance(v, int)}
    try:
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ValueError("no TFL3 identifier")
        model = tflite.Model.GetRootAsModel(data, 0)
        codes = []
        for i in range(model.OperatorCodesLength()):
            oc = model.OperatorCodes(i)
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            custom = oc.CustomCode()
            codes.append(custom.decode() if custom else names.get(code, f"builtin {code}"))
        ops, used = [], set()
        for s in range(model.SubgraphsLength()):
            sg = model.Subgraphs(s)
            ops += [codes[sg.Operators(j).OpcodeIndex()] for j in range(sg.OperatorsLength())]
            used |= {types.get(sg.Tensors(j).Type(), "?") for j in range(sg.TensorsLength())}
    except Exception as e:  # a truncated or crafted flatbuffer raises anything from struct to IndexError
        raise UserInputError(f"{where} is not a readable .tflite file ({type(e).__name__})") from None
    return ops, sorted(used)


def check_compilable(data: bytes, where: str) -> list[str]:
    """The file's operators; INT4 tensors are refused (Vela 5.2 crashes on them)."""
    ops, types = read_ops(data, where)
    if "INT4" in types:
        raise UserInputError(f"{where} holds INT4 weights: the Ethos-U targets take int8 files (Vela crashes on "
                             "INT4); export the run with 8-bit weights")
    if not ops:
        raise UserInputError(f"{where} has no operators")
    return ops


def _vela_version() -> str:
    try:
        from importlib.metadata import version
        return version("ethos-u-vela")
    except Exception:
        return "unknown"


def _number(text: str, pattern: str) -> int | None:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def compile_tflite(src: Path, target: str, dst: Path) -> dict:
    """Compile ``src`` for ``target`` with Vela into ``dst`` (written whole, or not at all; the
    caller renames it into place) and return Vela's figures."""
    if target not in ETHOS_U_TARGETS:
        raise UserInputError(f"unknown Ethos-U target {target!r}; choose one of: {', '.join(ETHOS_U_TARGETS)}")
    require_vela()
    data = Path(src).read_bytes()
    ops_in = check_compilable(data, str(src))
    system, memory = VELA_SYSTEMS[target]
    with tempfile.TemporaryDirectory(prefix=".export-vela-", dir=Path(dst).parent) as tmp:
        work = Path(tmp) / "model.tflite"
        shutil.copyfile(src, work)
        cmd = [sys.executable, "-c", "import sys; from ethosu.vela.vela import main; sys.exit(main())",
               "--accelerator-config", target, "--config", "Arm/vela.ini", "--system-config", system,
               "--memory-mode", memory, "--output-dir", str(Path(tmp) / "out"), str(work)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=VELA_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ExportError(f"Vela did not finish compiling {src.name} for {target} in {VELA_TIMEOUT} s") from None
        compiled = Path(tmp) / "out" / "model_vela.tflite"
        summaries = sorted((Path(tmp) / "out").glob("model_summary_*.csv"))
        if proc.returncode != 0 or not compiled.is_file() or not summaries:
            lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            why = lines[-1][:300] if lines else f"exit status {proc.returncode}"
            raise ExportError(f"Vela failed to compile {src.name} for {target}: {why}")
        with open(summaries[0], newline="") as f:
            row = next(csv.DictReader(f))
        ops_out, _ = read_ops(compiled.read_bytes(), f"Vela's output for {target}")
        shutil.copyfile(compiled, dst)
    cpu_ops = [op for op in ops_out if op != NPU_OP]

    def num(key: str) -> float:
        try:
            return float(row.get(key, "nan"))
        except ValueError:
            return float("nan")

    flash = num("off_chip_flash_memory_used") + num("on_chip_flash_memory_used")
    return {
        "target": target, "file": Path(dst).name, "vela_version": _vela_version(),
        "accelerator": row.get("accelerator_configuration"), "system_config": system, "memory_mode": memory,
        "clock_hz": num("core_clock"),
        "operators": len(ops_in), "operator_types": sorted(set(ops_in)),
        "on_npu": len(ops_in) - len(cpu_ops),        # the file's operators Vela put on the NPU
        "cpu_fallback": cpu_ops,                      # the ones left to the CPU, by name
        "vela_npu_operations": _number(proc.stdout, r"NPU operators = (\d+)"),   # after Vela's rewrites
        "vela_cpu_operations": _number(proc.stdout, r"CPU operators = (\d+)"),
        "npu_custom_ops": ops_out.count(NPU_OP),
        "sram_kib": num("sram_memory_used"), "flash_kib": flash, "dram_kib": num("dram_memory_used"),
        "weights_in": row.get("weights_storage_area"),
        "macs": int(num("nn_macs")),
        "cycles_npu": int(num("cycles_npu")), "cycles_total": int(num("cycles_total")),
        "inference_s": num("inference_time"), "inferences_per_s": num("inferences_per_second"),
    }


def describe(fig: dict) -> str:
    """One terminal line of Vela's figures."""
    fallback = (f"CPU fallback: {', '.join(fig['cpu_fallback'])}" if fig["cpu_fallback"] else "no CPU fallback")
    mem = f"SRAM {fig['sram_kib']:.1f} KiB, " + (f"flash {fig['flash_kib']:.1f} KiB" if fig["flash_kib"] else
                                                  f"DRAM {fig['dram_kib']:.1f} KiB")
    return (f"{fig['accelerator']} at {fig['clock_hz'] / 1e6:.0f} MHz (Vela {fig['vela_version']}, "
            f"{fig['system_config']}, {fig['memory_mode']}): {fig['on_npu']} of {fig['operators']} operators on the "
            "NPU, "
            f"{fallback}; {mem}; {fig['cycles_npu']:,} NPU cycles, {fig['cycles_total']:,} total, "
            f"{fig['inference_s'] * 1e3:.3f} ms, {fig['inferences_per_s']:,.0f} inferences/s")
