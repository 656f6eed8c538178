"""Backend ``cpp``: the compiled extension's kernels (see crossvit_kernels.backends for the contract).

Placeholder until the extension lands: the backend reports itself unavailable.
"""
from typing import Optional


def unavailable_reason() -> Optional[str]:
    return "the compiled extension is not implemented yet"


def supports(op, device, dtype) -> Optional[str]:
    return unavailable_reason()
