"""Peak FLOP/s of a GPU from its published dense figures: never guessed, never another part's number.

    >>> from stepscope.hardware import peak_flops
    >>> peak_flops("bf16", name="NVIDIA H200", capability=(9, 0), sm_count=132)
    989500000000000.0

A pure module: nothing here imports torch, so the table can be read and tested anywhere.
:func:`lookup` finds a part by compute capability and SM count (what the driver reports, exact),
and where several parts share both (L40 / L40S / RTX 6000 Ada; H100 SXM / H100 NVL / H200 /
GH200) by whole words of the device name, never by substrings: "L4" is not in "NVIDIA L40S"
here, because "L40S" is one word. A part the table does not know gives ``None``; an estimate
(SMs x clock x the architecture's FLOPs per SM per clock) is returned only when asked for, only for
architectures where one figure per SM holds across the parts, and is labelled as an estimate.

Figures are dense (datasheets often print "with sparsity" figures, twice these), in FLOP/s, for
``fp32`` (CUDA cores), ``tf32``, ``bf16``, ``fp16`` (tensor cores, fp32 accumulation: what PyTorch's
matmuls use) and ``fp8``. A part without tensor-core TF32 (Volta, Turing) answers ``tf32`` with its
fp32 figure: PyTorch then runs fp32 matmuls in fp32. A precision the part does not have gives None.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")

_T = 1e12


class Part(NamedTuple):
    name: str          # how the datasheet names it
    capability: tuple  # (major, minor)
    sms: int           # streaming multiprocessors
    words: frozenset   # words of the device name that tell it from the other rows with the same (capability, sms)
    tflops: dict       # dtype -> dense TFLOP/s, only the precisions the part has
    source: str        # the datasheet


def _part(name: str, cap: tuple, sms: int, words: str, source: str, **tflops: float) -> Part:
    return Part(name, cap, sms, frozenset(words.upper().split()), dict(tflops), source)


# Each row: the dense figures of the part's datasheet (the URL beside it). Where the datasheet
# prints sparse tensor figures only, they are halved here.
PARTS: tuple = (
    # https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf
    _part("Tesla V100 SXM2", (7, 0), 80, "V100 SXM2", "NVIDIA V100 datasheet", fp32=15.7, fp16=125.0),
    _part("Tesla V100 PCIe", (7, 0), 80, "V100 PCIE", "NVIDIA V100 datasheet", fp32=14.0, fp16=112.0),
    # https://images.nvidia.com/content/technologies/volta/pdf/v100s-datasheet-us-1165301-r5.pdf
    _part("Tesla V100S PCIe", (7, 0), 80, "V100S", "NVIDIA V100S datasheet", fp32=16.4, fp16=130.0),
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf
    _part("Tesla T4", (7, 5), 40, "T4", "NVIDIA T4 datasheet", fp32=8.1, fp16=65.0),
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    # (40 GB and 80 GB, SXM and PCIe: the same figures)
    _part("A100", (8, 0), 108, "A100", "NVIDIA A100 datasheet", fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0),
    # https://www.nvidia.com/content/dam/en-zz/Solutions/data-center/products/a30-gpu/pdf/a30-datasheet.pdf
    _part("A30", (8, 0), 56, "A30", "NVIDIA A30 datasheet", fp32=10.3, tf32=82.0, bf16=165.0, fp16=165.0),
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf
    _part("A10", (8, 6), 72, "A10", "NVIDIA A10 datasheet", fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0),
    # https://images.nvidia.com/content/Solutions/data-center/a40/nvidia-a40-datasheet.pdf
    _part("A40", (8, 6), 84, "A40", "NVIDIA A40 datasheet", fp32=37.4, tf32=74.8, bf16=149.7, fp16=149.7),
    # https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/l4/PB-11316-001_v01.pdf
    _part("L4", (8, 9), 58, "L4", "NVIDIA L4 datasheet", fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0,
          fp8=242.5),
    # https://images.nvidia.com/content/Solutions/data-center/vgpu-L40-datasheet.pdf
    _part("L40", (8, 9), 142, "L40", "NVIDIA L40 datasheet", fp32=90.5, tf32=90.5, bf16=181.0, fp16=181.0,
          fp8=362.0),
    # https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413
    _part("L40S", (8, 9), 142, "L40S", "NVIDIA L40S datasheet", fp32=91.6, tf32=183.0, bf16=362.05,
          fp16=362.05, fp8=733.0),
    # https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/rtx-6000/proviz-print-rtx6000-datasheet-web-2504660.pdf
    _part("RTX 6000 Ada Generation", (8, 9), 142, "RTX 6000 ADA", "NVIDIA RTX 6000 Ada datasheet", fp32=91.1,
          tf32=91.1, bf16=182.1, fp16=182.1, fp8=364.2),
    # https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (appendix:
    # FP16/BF16 with FP32 accumulate; GeForce runs those at half the FP16-accumulate rate)
    _part("GeForce RTX 4090", (8, 9), 128, "RTX 4090", "NVIDIA Ada GPU architecture whitepaper", fp32=82.6,
          tf32=82.6, bf16=165.2, fp16=165.2, fp8=330.3),
    # https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
    _part("H100 SXM", (9, 0), 132, "H100", "NVIDIA H100 datasheet", fp32=67.0, tf32=494.5, bf16=989.5,
          fp16=989.5, fp8=1979.0),
    _part("H100 NVL", (9, 0), 132, "H100 NVL", "NVIDIA H100 datasheet", fp32=60.0, tf32=417.5, bf16=835.5,
          fp16=835.5, fp8=1670.5),
    _part("H100 PCIe", (9, 0), 114, "H100", "NVIDIA H100 datasheet", fp32=51.0, tf32=378.0, bf16=756.5,
          fp16=756.5, fp8=1513.0),
    # https://resources.nvidia.com/en-us-data-center-overview-mc/en-us-data-center-overview/hpc-datasheet-sc23-h200
    _part("H200 SXM", (9, 0), 132, "H200", "NVIDIA H200 datasheet", fp32=67.0, tf32=494.5, bf16=989.5,
          fp16=989.5, fp8=1979.0),
    _part("H200 NVL", (9, 0), 132, "H200 NVL", "NVIDIA H200 datasheet", fp32=60.0, tf32=417.5, bf16=835.5,
          fp16=835.5, fp8=1670.5),
    # https://resources.nvidia.com/en-us-grace-cpu/grace-hopper-superchip (the GPU of GH200)
    _part("GH200", (9, 0), 132, "GH200", "NVIDIA GH200 Grace Hopper Superchip datasheet", fp32=67.0,
          tf32=494.5, bf16=989.5, fp16=989.5, fp8=1979.0),
    # https://resources.nvidia.com/en-us-blackwell-architecture (HGX B200, per GPU)
    _part("B200", (10, 0), 148, "B200", "NVIDIA HGX B200 datasheet", fp32=75.0, tf32=1100.0, bf16=2250.0,
          fp16=2250.0, fp8=4500.0),
)

# Dense FLOPs per SM per clock, for the architectures where every part has the same figure (so
# that SMs x clock x this is a fair estimate for a part missing from PARTS). Ada (8.9) and GA10x
# (8.6) are left out: their GeForce parts run fp32-accumulate tensor math at half the rate of
# the workstation and data-centre parts, so one figure would be wrong for half of them. Derived
# from the rows above: A100 312e12 / (108 SMs x 1410 MHz) = 2048; H100 SXM 989.5e12 /
# (132 x 1830 MHz) = 4096; V100 SXM2 125e12 / (80 x 1530 MHz) = 1024.
PER_SM_CLOCK: dict = {
    (7, 0): {"fp32": 128, "fp16": 1024},
    (8, 0): {"fp32": 128, "tf32": 1024, "bf16": 2048, "fp16": 2048},
    (9, 0): {"fp32": 256, "tf32": 2048, "bf16": 4096, "fp16": 4096, "fp8": 8192},
}


class Peak(NamedTuple):
    flops: float   # FLOP/s
    dtype: str     # the precision the figure is for (tf32 asked of a part without it: fp32)
    source: str    # "datasheet", "estimate", "measured" or "user"
    part: str      # the table row, or what the estimate was made from
    note: str      # how it was found (for a report's reader)


def words(name: str) -> frozenset:
    """The whole words of a device name, upper case: "NVIDIA H100 NVL" -> {NVIDIA, H100, NVL}."""
    return frozenset(w for w in re.split(r"[^0-9A-Za-z]+", name.upper()) if w)


def _check(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"stepscope: dtype must be one of {DTYPES}; got {dtype!r}")


def find_part(*, name: Optional[str], capability: tuple, sm_count: int) -> Optional[Part]:
    """The table's row for a device, or None. Rows must match the capability and SM count exactly;
    among those, the row whose words all appear in ``name`` with the most words wins (H100 NVL over
    H100 for "NVIDIA H100 NVL"). Without a name, only a (capability, SMs) pair that one row alone
    has is found. Several rows with equally many matching words: None (no row is preferred)."""
    cap = tuple(capability)
    rows = [p for p in PARTS if p.capability == cap and p.sms == int(sm_count)]
    if name is None:
        return rows[0] if len(rows) == 1 else None
    have = words(name)
    fits = [p for p in rows if p.words <= have]
    if not fits:
        return None
    best = max(len(p.words) for p in fits)
    top = [p for p in fits if len(p.words) == best]
    return top[0] if len(top) == 1 else None


def lookup(dtype: str, *, name: Optional[str] = None, capability: tuple, sm_count: int,
           clock_mhz: Optional[float] = None, estimate: bool = False) -> Optional[Peak]:
    """The dense peak for ``dtype`` on the device described, with where it came from, or None.

    The datasheet row when :func:`find_part` finds one. Otherwise, only with ``estimate=True``
    and a ``clock_mhz``, SMs x clock x :data:`PER_SM_CLOCK` for a known architecture, labelled
    ``"estimate"``. Never a figure of another part."""
    _check(dtype)
    part = find_part(name=name, capability=capability, sm_count=sm_count)
    if part is not None:
        got = dtype if dtype in part.tflops else ("fp32" if dtype == "tf32" and "fp32" in part.tflops else None)
        if got is None:
            return None
        note = f"{part.name}, {part.source}" + (" (no TF32 tensor cores: fp32)" if got != dtype else "")
        return Peak(part.tflops[got] * _T, got, "datasheet", part.name, note)
    per = PER_SM_CLOCK.get(tuple(capability))
    if not estimate or clock_mhz is None or per is None:
        return None
    got = dtype if dtype in per else ("fp32" if dtype == "tf32" and "fp32" in per else None)
    if got is None:
        return None
    flops = float(sm_count) * float(clock_mhz) * 1e6 * per[got]
    what = f"{name or 'unknown part'} (sm_{capability[0]}{capability[1]}, {sm_count} SMs, {clock_mhz:g} MHz)"
    return Peak(flops, got, "estimate", what,
                f"estimate: {sm_count} SMs x {clock_mhz:g} MHz x {per[got]} FLOPs per SM per clock; not in the table")


def peak_flops(dtype: str, *, name: Optional[str] = None, capability: tuple, sm_count: int,
               clock_mhz: Optional[float] = None) -> Optional[float]:
    """The datasheet's dense peak FLOP/s for ``dtype`` on this device, or None when the table does
    not know the part (or the part lacks the precision). No estimate: see :func:`lookup`."""
    got = lookup(dtype, name=name, capability=capability, sm_count=sm_count, clock_mhz=clock_mhz)
    return got.flops if got is not None else None
