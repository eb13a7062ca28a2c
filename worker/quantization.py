"""Which quantization modes a device can run, known without torch: the launcher refuses a mode
before any worker starts, and the loader checks again for a worker started another way."""

from __future__ import annotations

from gemma_batch.errors import AppError

# Where torchao (0.18) has kernels for each of its modes: on CPUs or not, and the least CUDA
# compute capability. int8-wo is torch's own int8 weight-only matmul, on both; int4-wo packs for
# tinygemm's tensor-core kernel (sm80+) and torchao no longer packs int4 for CPUs; fp8 needs
# float8 tensor cores (sm89+: Ada, Hopper and newer).
TORCHAO_KERNELS: dict[str, tuple[bool, tuple[int, int]]] = {
    "int8-wo": (True, (0, 0)),
    "int4-wo": (False, (8, 0)),
    "fp8": (False, (8, 9)),
}


class UnsupportedQuantization(AppError):
    """A quantization the device has no kernels for; raised before any weight is loaded."""


def check_mode(quantization: str, device: str, card: tuple[str, tuple[int, int]] | None) -> None:
    """Refuse, naming the mode and the device, a torchao mode this device cannot run; `card` is
    the GPU's name and compute capability when `device` is cuda."""
    if quantization not in TORCHAO_KERNELS:
        return
    on_cpu, (major, minor) = TORCHAO_KERNELS[quantization]
    if device == "cpu" or card is None:
        if not on_cpu:
            raise UnsupportedQuantization(
                f"quantization {quantization} has no CPU kernels; this worker's device is cpu "
                f"(it needs a CUDA GPU of compute capability {major}.{minor} or newer)"
            )
        return
    name, have = card
    if have < (major, minor):
        raise UnsupportedQuantization(
            f"quantization {quantization} needs a CUDA GPU of compute capability {major}.{minor} "
            f"or newer; this worker's device is {name} (compute capability {have[0]}.{have[1]})"
        )
