"""Model FLOPs utilisation: the model's FLOPs per token against the devices' peak.

``MFU = model FLOPs per token × tokens per second ÷ (peak FLOP/s per device × devices)``.
The FLOPs per token are the *training* FLOPs of :func:`xformjax.models.model_cost`:
three forward passes per token (the forward, and a backward of twice its cost), with
the forward counted analytically as ``2 ×`` the weights of every matrix multiply plus
each mixer's sequence-mixing term. Recomputation (remat) is not counted: MFU counts
the model's FLOPs, not the hardware's. The peak is the device's dense bf16 figure
(:data:`TPU_PEAKS`, :data:`GPU_PEAKS`, looked up by ``device.device_kind``); on a
CPU or a device kind not in the tables there is no peak, and MFU is ``None``
("n/a")::

    peak_flops("NVIDIA H100 80GB HBM3")  # 989e12
    peak_flops("cpu")                    # None
"""

from __future__ import annotations

#: Dense bf16 peaks of TPU chips, FLOP/s, by the exact ``device_kind`` JAX reports
#: ("TPU v5 lite" is v5e, "TPU v5" is v5p, "TPU v6 lite" is v6e / Trillium; the
#: marketing names are accepted too). Sources: Google Cloud's TPU documentation,
#: cloud.google.com/tpu/docs/v4 (275 TFLOP/s), /v5e (197), /v5p (459), /v6e (918).
TPU_PEAKS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}

#: Dense bf16 Tensor Core peaks of NVIDIA GPUs, FLOP/s, matched as a case-insensitive
#: part of ``device_kind`` (CUDA's device name: "NVIDIA H100 80GB HBM3" is the SXM
#: card, "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA GH200 480GB",
#: "NVIDIA A100-SXM4-80GB"); the first match wins, so the PCIe and NVL cards come
#: before the SXM ones. Sources: NVIDIA's H100 and H200 datasheets (bf16 "with
#: sparsity" 1,979 TFLOP/s for SXM, 1,513 for H100 PCIe, 1,671 for the NVL cards;
#: the dense peak is half) and the A100 datasheet (312 TFLOP/s dense, every variant).
GPU_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),  # also GH200 (its GPU is an H100 / H200 SXM)
    ("A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of one device of ``device_kind``, or ``None`` where
    it is unknown (a CPU, or a kind not in :data:`TPU_PEAKS` / :data:`GPU_PEAKS`)."""
    if device_kind in TPU_PEAKS:
        return TPU_PEAKS[device_kind]
    kind = device_kind.lower()
    if "nvidia" not in kind:
        return None
    return next((peak for name, peak in GPU_PEAKS if name.lower() in kind), None)


def model_flops_utilization(
    flops_per_token: float, tokens_per_second: float, peak_per_device: float | None, devices: int
) -> float | None:
    """The fraction of the devices' peak the model's FLOPs use: ``flops_per_token ×
    tokens_per_second ÷ (peak_per_device × devices)``; ``None`` without a peak."""
    if peak_per_device is None:
        return None
    return flops_per_token * tokens_per_second / (peak_per_device * devices)
