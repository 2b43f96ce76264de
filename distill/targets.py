"""What each deployment target gets from ``appliance export``: one table, read top to bottom.

To add a target, add a row to ``TARGETS``; every field is documented on
``TargetProfile``. The exporter reads nothing else, so the table is the
whole story of how a package for a target is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.formats import GGUF_QUANT_TYPES  # noqa: F401  (re-exported: the exporter's gguf_quant names)

FORMATS = ("onnx", "gguf")


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    formats: tuple[str, ...]  # formats this target serves; --format both exports all of them
    block_size: int  # ONNX INT4: weights per scale (32 = closer to fp32, 128 = smaller and faster on GPU)
    symmetric: bool  # ONNX INT4: zero point fixed at 8 (symmetric) or stored per block
    compute: str  # ONNX graph precision: "fp32" (int8 activations on CPU kernels) or "fp16" (GPU tensor cores)
    accuracy_level: int  # MatMulNBits compute type: 4 = int8 activations (fast CPU kernels), 0 = as the graph's float
    # llama.cpp quant type. IQ4_NL: Q4_0's size and repacked ARM NEON kernels, a non-linear grid that rounds closer;
    # Q4_K_M: best on x86 and CUDA (bench/results/gguf_rounding/summary.md)
    gguf_quant: str
    provider: str  # ONNX Runtime execution provider the package is built for: cpu, cuda or tensorrt
    quantize_embedding: bool = True  # the token embedding, the largest tensor of small models; a tied one shares the head's bits
    lm_head_bits: int = 8  # output projection: 8 costs little and is what keeps small models' answers close; 4; 0 = float
    mixed: bool = True  # ONNX: v_proj/down_proj at 8 bits in the layers Q4_K_M favours (+7% bytes, much closer to fp32)


TARGETS: dict[str, TargetProfile] = {
    profile.name: profile
    for profile in (
        TargetProfile(
            name="jetson", description="NVIDIA Jetson (Orin): CUDA on a shared-memory ARM SoC",
            formats=("onnx", "gguf"), block_size=32, symmetric=True, compute="fp16", accuracy_level=0,
            gguf_quant="Q4_K_M", provider="cuda",
        ),
        TargetProfile(
            # Blocks of 64: the fp32 graph stores a 4-byte scale per block, so blocks of 32 put the student's package
            # at 0.213x fp32; 64 gives 0.197x, and 1.011x fp32 perplexity with --algorithm qat (1.081x with gptq).
            name="arm", description="ARM boards without a usable GPU (Raspberry Pi 5, Graviton, RK3588)",
            formats=("gguf", "onnx"), block_size=64, symmetric=True, compute="fp32", accuracy_level=4,
            gguf_quant="IQ4_NL", provider="cpu",
        ),
        TargetProfile(
            name="gpu", description="small discrete NVIDIA GPU in a PC (RTX A2000, T4, L4)",
            formats=("onnx", "gguf"), block_size=128, symmetric=False, compute="fp16", accuracy_level=0,
            gguf_quant="Q4_K_M", provider="cuda",
        ),
        TargetProfile(
            name="cpu", description="x86-64 CPU (AVX2/AVX-512)",
            formats=("gguf", "onnx"), block_size=32, symmetric=True, compute="fp32", accuracy_level=4,
            gguf_quant="Q4_K_M", provider="cpu",
        ),
    )
}


class UnknownTarget(ValueError):
    """No profile of that name; the message lists the known ones."""


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTarget(f"unknown target {name!r}: use one of {', '.join(TARGETS)} (profiles in distill/targets.py)") from None


def formats_for(profile: TargetProfile, requested: str) -> tuple[str, ...]:
    """The formats to export: "both" means every format the target serves."""
    if requested == "both":
        return profile.formats
    if requested not in profile.formats:
        raise UnknownTarget(f"target {profile.name!r} does not serve {requested!r} (it serves {', '.join(profile.formats)})")
    return (requested,)
