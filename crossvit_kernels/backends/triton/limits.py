"""The triton backend's limits on the ops' sizes (``TritonBackend.size_limits``), as data.

Each is a hard limit of the kernels at the launchers' configurations, beyond which a launch fails
(a KeyError, or Triton's OutOfResources on the GPU) instead of computing; the registry skips the
backend for such inputs under ``auto`` and refuses them, naming the limit, when the backend is
asked for by name.

* 16-bit tokens: the token tiles are chosen per padded width up to HALF_MAX_WIDTH
  (``cross_attention._HALF_BLOCK_N``).
* Shared memory per program on a GPU: upper bounds of what the kernels take
  (``cross_attention.stream_shared_bytes``, ``projections.projection_shared_bytes``,
  ``fusion.stage_shared_bytes``), against the device's opt-in maximum per block; the backward's
  only for inputs that need a gradient.
* Programs per launch: Triton's 1-D grids hold at most 2^31 - 1.

The width limit comes first for 16-bit tokens: the shared-memory bounds read the tile table it
covers. Grid y dimensions (heads in the projection and combine launches) stay below 65535 wherever
the shared-memory bounds hold.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..base import FLOAT_DTYPES, HALF_AND_SINGLE, SizeLimit, shared_memory_per_block
from . import cross_attention as K
from . import fusion as FS
from . import projections as P

HALF = (torch.float16, torch.bfloat16)
#: the most programs of a 1-D Triton grid
MAX_GRID = 2 ** 31 - 1
_OTHER = "use backend='cuda' or 'torch'"


def _xattn_shared(which: str, dtype: torch.dtype):
    """The cross-attention's largest launch of pass ``which`` for ``dtype``: the streaming kernel,
    and in the forward the fused projection kernels (float16, bfloat16, float32)."""
    def size(s):
        stream = K.stream_shared_bytes(which, s["C"], s["H"], dtype)
        if which == "fwd" and dtype in HALF_AND_SINGLE:
            return max(stream, P.projection_shared_bytes(s["C"], s["H"]))
        return stream
    return size


def _stage_shared(which: str, dtype: torch.dtype):
    return lambda s: FS.stage_shared_bytes(which, s["C0"], s["C1"], s["H0"], s["H1"], dtype)


_PASS = {"fwd": "forward", "bwd": "backward"}


SIZE_LIMITS: Dict[str, Tuple[SizeLimit, ...]] = {
    "cross_attention": (
        SizeLimit("the width C of 16-bit tokens", lambda s: s["C"], K.HALF_MAX_WIDTH,
                  f"the token tiles of float16 and bfloat16 are chosen up to C = {K.HALF_MAX_WIDTH}; " + _OTHER,
                  dtypes=HALF),
        *(SizeLimit(f"the shared memory of the {_PASS[which]}'s largest launch (an upper bound, bytes per program)",
                    _xattn_shared(which, dtype), shared_memory_per_block,
                    "the kernels' tiles for this width and head count do not fit this GPU's shared memory per "
                    "block; " + _OTHER, dtypes=(dtype,), devices=("cuda",), backward=which == "bwd")
          for which in ("fwd", "bwd") for dtype in FLOAT_DTYPES),
        SizeLimit("the program count of the token pass (B x MAX_SPLITS)", lambda s: s["B"] * K.MAX_SPLITS,
                  MAX_GRID, "a 1-D Triton grid; split the batch", devices=("cuda",)),
    ),
    "fusion_stage": (
        SizeLimit("the wider branch width max(C0, C1) of 16-bit tokens", lambda s: max(s["C0"], s["C1"]),
                  K.HALF_MAX_WIDTH,
                  f"the token tiles of float16 and bfloat16 are chosen up to C = {K.HALF_MAX_WIDTH}; the fusion "
                  "then runs per piece", dtypes=HALF),
        *(SizeLimit(f"the shared memory of the stage's largest {_PASS[which]} launch (an upper bound, bytes per "
                    "program)", _stage_shared(which, dtype), shared_memory_per_block,
                    "the kernels' tiles for these widths and head counts do not fit this GPU's shared memory per "
                    "block; the fusion then runs per piece", dtypes=(dtype,), devices=("cuda",),
                    backward=which == "bwd")
          for which in ("fwd", "bwd") for dtype in HALF_AND_SINGLE),
        SizeLimit("the program count of the stage's largest launch",
                  lambda s: FS.stage_max_programs(s["B"], s["C0"], s["C1"], s["H0"], s["H1"]), MAX_GRID,
                  "a 1-D Triton grid; split the batch", devices=("cuda",)),
    ),
}
