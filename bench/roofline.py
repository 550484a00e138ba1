"""Roofline model of the fused contrastive losses on H100 / H200: what each kernel must compute and
move (tensor-core FLOPs, unavoidable HBM bytes, special-function ops), and the time that takes at
the card's peak rates. The model, its peaks and their sources: docs/loss.md, section 4.

    python bench/roofline.py                       # the README's headline shapes on H100 / H200
    python bench/roofline.py --batches 32768 --dims 768,1024 --dtype fp16 --kernels
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as bench/roofline.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

# Mirrors llm2clip_kernels._triton (tests/test_kernel_resources.py checks they agree).
FWD_BM = 128  # rows per forward program: the column partials are per BM rows
WS_ROWS = WS_COLS = 8192  # the backward's dS workspace (a superblock)
FWD_TARGET_PROGRAMS = 2 * 132  # the forward's column splits aim at 2 programs per SM (H100/H200)


@dataclasses.dataclass(frozen=True)
class Device:
    """Peak rates of one card (dense, no sparsity)."""

    name: str
    tflops: dict  # precision -> TFLOP/s: "bf16" (also fp16), "tf32" (tensor cores), "fp32", "fp64" (FMA)
    hbm_tb_s: float  # HBM bandwidth, TB/s (10^12 bytes/s)
    exp_t_s: float  # special-function (exp) rate, 10^12 per s
    memory_gb: float
    sms: int
    source: str


H100_SXM = Device(
    "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9, "fp64": 33.5}, 3.35, 3.9, 80, 132,
    "NVIDIA H100 Tensor Core GPU datasheet (SXM5: BF16 1979 / TF32 989 TFLOPS with sparsity, "
    "FP32 67 / FP64 34 TFLOPS, 3.35 TB/s HBM3); exp rate from the FlashAttention-3 paper (3.9 TFLOPS of "
    "special functions on H100 SXM5)",
)  # fmt: skip
H100_PCIE = Device(
    "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2, "fp64": 25.6}, 2.0, 3.0, 80, 114,
    "NVIDIA H100 datasheet (PCIe: BF16 1513 / TF32 756 TFLOPS with sparsity, FP32 51 / "
    "FP64 26 TFLOPS, 2.0 TB/s HBM2e); exp rate: the SXM5 figure scaled by SMs x boost clock "
    "(114 x 1.755 vs 132 x 1.98 GHz)",
)  # fmt: skip
H200 = Device(
    "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9, "fp64": 33.5}, 4.8, 3.9, 141, 132,
    "NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1979 / TF32 989 TFLOPS with sparsity, FP32 67 / "
    "FP64 34 TFLOPS, 4.8 TB/s HBM3e, 141 GB); exp rate as H100 SXM (same GH100 SMs and clocks)",
)  # fmt: skip
DEVICES = {"h100": H100_SXM, "h100-pcie": H100_PCIE, "h200": H200}

# The README's headline shapes: (b, B, D) with bf16 inputs.
HEADLINE = ((32768, 32768, 1024), (262144, 262144, 1024))


def match_device(device_name: str | None) -> Device | None:
    """The model's device for a torch.cuda.get_device_name() string, or None when not modelled."""
    n = (device_name or "").upper()
    if "H200" in n:
        return H200
    if "H100" in n:
        return H100_PCIE if "PCIE" in n else H100_SXM
    return None


@dataclasses.dataclass
class KernelCost:
    """What one kernel (all its launches in one loss call) computes and moves."""

    name: str
    part: str  # "fwd" | "bwd"
    flops: float
    precision: str  # key of Device.tflops
    bytes: float
    exps: float = 0.0

    def times(self, dev: Device) -> dict:
        t = {
            "tensor_s": self.flops / (dev.tflops[self.precision] * 1e12),
            "memory_s": self.bytes / (dev.hbm_tb_s * 1e12),
            "exp_s": self.exps / (dev.exp_t_s * 1e12),
        }
        t["model_s"] = max(t["tensor_s"], t["memory_s"])
        t["with_exp_s"] = max(t["tensor_s"] + t["exp_s"], t["memory_s"])
        t["bound"] = "tensor" if t["tensor_s"] >= t["memory_s"] else "memory"
        return t


def _itemsize(dtype: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]


def loss_costs(
    b: int, B: int, D: int, dtype: str = "bf16", sigmoid: bool = False, tf32: bool = False
) -> list:
    """KernelCost of every kernel of one forward + backward of infonce_loss / sigmoid_loss
    (b images against B texts, D features) on the Triton path."""
    e = _itemsize(dtype)
    dot = "fp32" if (dtype == "fp32" and not tf32) else ("tf32" if dtype == "fp32" else "bf16")
    ws_e = 2 if dtype == "bf16" else 4  # the dS workspace: bf16 for bf16 inputs, fp32 otherwise
    gemm_dot = dot if dtype != "fp16" else "tf32"  # fp16 path: fp32 workspace x fp16 features, tf32
    r_blocks = math.ceil(b / FWD_BM)
    n_r, n_c = math.ceil(b / WS_ROWS), math.ceil(B / WS_COLS)
    # The forward splits the columns so about 2 programs per SM run (at least one split).
    splits = max(1, min(math.ceil(FWD_TARGET_PROGRAMS / max(1, min(r_blocks, 64))), math.ceil(B / 256)))
    stats = 2 * 4 * (r_blocks * B + splits * b)  # fp32 [max, sum] partials, written once and read once
    costs = [
        KernelCost("forward sweep", "fwd", 2.0 * b * B * D, dot,
                   (b + B) * D * e + (0 if sigmoid else 2 * stats),
                   exps=(3.0 if sigmoid else 2.0) * b * B),
        KernelCost("positive logits", "fwd", 2.0 * b * D, "fp64", 2 * b * D * e + 16 * b),
        KernelCost("dS tiles", "bwd", 2.0 * b * B * D, dot, (b * n_c + B * n_r) * D * e + b * B * ws_e,
                   exps=2.0 * b * B),
        KernelCost("dI = dS T", "bwd", 2.0 * b * B * D, gemm_dot,
                   b * B * ws_e + B * D * e * n_r + b * D * e + 8.0 * b * D * (n_c - 1)),
        KernelCost("dT = dS^T I", "bwd", 2.0 * b * B * D, gemm_dot,
                   b * B * ws_e + b * D * e * n_c + B * D * e + 8.0 * B * D * (n_r - 1)),
    ]  # fmt: skip
    return costs


def extra_memory_bytes(b: int, B: int, D: int, dtype: str = "bf16") -> float:
    """Peak bytes the loss allocates beyond its inputs (backward: workspace, fp32 accumulators,
    gradients; the forward's partials are freed before)."""
    e, ws_e = _itemsize(dtype), (2 if dtype == "bf16" else 4)
    rows, cols = min(b, WS_ROWS), min(B, WS_COLS)
    acc = (B * D * 4 if b > WS_ROWS and dtype != "fp32" else 0) + (
        rows * D * 4 if B > WS_COLS and dtype != "fp32" else 0
    )
    return rows * cols * ws_e + acc + (b + B) * D * e + 4 * 4 * (b + B)


def predict(
    b: int, B: int, D: int, dev: Device, dtype: str = "bf16", sigmoid: bool = False, tf32: bool = False
):
    """Model times (ms) of forward, backward and both, the per-kernel rows, and the FLOP count."""
    rows = []
    total = {"fwd": 0.0, "bwd": 0.0, "fwd_exp": 0.0, "bwd_exp": 0.0}
    for c in loss_costs(b, B, D, dtype, sigmoid, tf32):
        t = c.times(dev)
        total[c.part] += t["model_s"]
        total[c.part + "_exp"] += t["with_exp_s"]
        rows.append({**dataclasses.asdict(c), **t})
    return {
        "device": dev.name,
        "fwd_ms": total["fwd"] * 1e3,
        "bwd_ms": total["bwd"] * 1e3,
        "fwd_bwd_ms": (total["fwd"] + total["bwd"]) * 1e3,
        "fwd_bwd_with_exp_ms": (total["fwd_exp"] + total["bwd_exp"]) * 1e3,
        "kernels": rows,
        "useful_tflop": 8.0 * b * B * D / 1e12,
        "extra_memory_gib": extra_memory_bytes(b, B, D, dtype) / 2**30,
    }


def format_predictions(shapes, devices, dtype="bf16", sigmoid=False, kernels=False) -> str:
    """A table of model times; every number is a prediction, not a measurement. f+b ms and TFLOP/s
    are the roofline; +exp ms adds the special-function time of the sweeps (docs/loss.md, section 4)."""
    rows = [
        {"device": dev.name, "b": b, "B": B, "D": D, **predict(b, B, D, dev, dtype, sigmoid)}
        for b, B, D in shapes
        for dev in devices
    ]
    cols = [("device", "device", ""), ("b", "b", "d"), ("B", "B", "d"), ("D", "D", "d"),
            ("fwd ms", "fwd_ms", ".2f"), ("bwd ms", "bwd_ms", ".2f"), ("f+b ms", "fwd_bwd_ms", ".2f"),
            ("TFLOP/s", lambda p: p["useful_tflop"] / (p["fwd_bwd_ms"] * 1e-3), ".0f"),
            ("+exp ms", "fwd_bwd_with_exp_ms", ".2f"), ("mem GiB", "extra_memory_gib", ".2f"),
            ("", lambda p: "predicted", "")]  # fmt: skip
    lines = common.table(rows, cols).splitlines()
    if not kernels:
        return "\n".join(lines)
    out = lines[:2]
    for line, p in zip(lines[2:], rows):
        out.append(line)
        out += [
            f"    {k['name']:16s} {k['flops'] / 1e12:8.2f} TFLOP {k['bytes'] / 1e9:7.2f} GB "
            f"{k['exps'] / 1e9:8.2f} G sfu -> {k['model_s'] * 1e3:8.3f} ms ({k['bound']}-bound), "
            f"{k['with_exp_s'] * 1e3:.3f} ms with the sfu time"
            for k in p["kernels"]
        ]
    return "\n".join(out)


# fmt: off
OPTIONS = [
    ("--batches", common.int_list, None, "b = B values (default: the headline shapes 32768, 262144)"),
    ("--dims", common.int_list, (1024,), "D values"),
    ("--dtype", ("bf16", "fp16", "fp32"), "bf16", "input dtype"),
    ("--sigmoid", bool, False, "the sigmoid loss instead of InfoNCE"),
    ("--kernels", bool, False, "also each kernel's FLOPs, bytes, exps and bound"),
]
# fmt: on


def main(argv=None) -> int:
    args = common.parse(common.parser(__doc__, OPTIONS, (), out=False), argv)
    shapes = HEADLINE if args.batches is None else [(n, n, D) for D in args.dims for n in args.batches]
    print(format_predictions(shapes, [H100_SXM, H200], args.dtype, args.sigmoid, args.kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
