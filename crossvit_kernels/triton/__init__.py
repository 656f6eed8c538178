"""Backend ``triton``: fused Triton kernels (see crossvit_kernels.backends for the contract).

Placeholder until the Triton kernels land: the backend reports itself unavailable.
"""
from typing import Optional


def unavailable_reason() -> Optional[str]:
    return "the Triton kernels are not implemented yet"


def supports(op, device, dtype) -> Optional[str]:
    return unavailable_reason()
