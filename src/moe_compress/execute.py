"""How a recipe executes: `compress` runs a validated `Recipe` as its ``execution`` field says.

In memory (`moe_compress.pipeline.compress_in_memory`: the whole model loaded, the layer runner with
`pipeline.ApplySink`) or streamed layer by layer (`moe_compress.streaming.compress_streaming`; also under
torchrun). `pipeline.resolve_execution` makes ``auto`` concrete. This dispatcher sits above both `pipeline` and
`streaming` (docs/architecture.md, Layers), so neither imports the other upwards; the CLI builds the recipe and
calls it.
"""

from __future__ import annotations

from typing import Callable

from moe_compress.calibration.stats import Statistics
from moe_compress.errors import UserError
from moe_compress.pipeline import CompressResult, Progress, compress_in_memory, resolve_execution
from moe_compress.recipe import Recipe

__all__ = ["CompressResult", "compress"]


def compress(recipe: Recipe, progress: Progress | None = None, write: bool = True,
             log: Callable[[str], None] | None = None) -> CompressResult:
    """Execute ``recipe`` as its ``execution`` says (`resolve_execution`): in memory (`compress_in_memory`) or
    streamed layer by layer (`moe_compress.streaming.compress_streaming`: always writes; ``result.model`` is
    None and ``result.streamed`` holds its `StreamResult`). compression.json records the concrete execution."""
    execution = resolve_execution(recipe)
    recipe = recipe.model_copy(update={"execution": execution})
    if execution.mode == "stream":
        if not write:
            raise UserError("a streamed compression writes its output layer by layer: it cannot run with write=False")
        from moe_compress.streaming import compress_streaming

        res = compress_streaming(recipe, progress=progress, log=log)
        return CompressResult(None, None, res.manifest, Statistics(), res.timings, streamed=res)
    return compress_in_memory(recipe, progress, write)
