"""Several processes (GPUs) for one compression, through torch.distributed.

Launched with ``torchrun --nproc-per-node N moe-compress compress ...``, every process runs the same streaming
compression (`moe_compress.streaming`): `DistContext` is the layer runner's `BatchSplit`
(`moe_compress.calibration.runner`): each decoder layer's calibration batches are spread over the ranks
(batch b goes to rank b mod N), the statistics are all-reduced so that every rank plans exactly the same
compression, and rank 0 writes the output. NCCL on GPUs, gloo on CPU. Without torchrun (no ``WORLD_SIZE`` in
the environment, or 1) nothing here initialises anything and the same code runs in one process.

Statistics reduction: the routed accumulator's sums are summed and ``max_activation`` is max-reduced; every
`LayerObserver` plug-in's state tensors are summed (all built-in plug-ins accumulate sums: similarity and
moment sums, domain counts; a tensor that grew on one rank, e.g. domain counts, is zero-padded first) and its
integer ``count`` summed. The MoE-input capture of methods that need inputs is all-gathered in batch order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def local_batches(self, n_batches: int) -> list[int]:
        """The calibration batches this rank runs: b = rank, rank + world, ... (the runner's `BatchSplit`)."""
        return [b for b in range(n_batches) if b % self.world == self.rank]

    def reduce(self, observer, capture=None, local: list[int] | None = None) -> None:
        """`reduce_observer`: every rank's statistics (the runner's `BatchSplit`)."""
        reduce_observer(self, observer, capture, local)

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialised_here = False


def world_size() -> int:
    """The number of processes torchrun launched (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """This process's rank as torchrun set it (``RANK``; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(device: str) -> DistContext:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a single-process context otherwise."""
    world = world_size()
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank = rank_from_env()
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local, here)


def _comm_device(ctx: DistContext, t: torch.Tensor) -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(ctx: DistContext, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (any device; moved to the backend's device and back when needed)."""
    if not ctx.active:
        return t
    import torch.distributed as dist

    dev = _comm_device(ctx, t)
    buf = t if t.device == dev else t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if buf is not t:
        t.copy_(buf)
    return t


def all_reduce_padded(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, where ranks may hold tensors of different shapes (zero-padded to the largest
    extent of each axis)."""
    if not ctx.active:
        return t
    shapes = all_gather_object(ctx, tuple(t.shape))
    full = tuple(max(s[d] for s in shapes) for d in range(t.dim()))
    if full != tuple(t.shape):
        grown = t.new_zeros(full)
        grown[tuple(slice(0, n) for n in t.shape)] = t
        t = grown
    return all_reduce_(ctx, t)


def all_gather_object(ctx: DistContext, obj) -> list:
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reduce_observer(ctx: DistContext, observer, capture=None, local_batches: list[int] | None = None) -> None:
    """Make ``observer`` (an `ObservedExperts`) hold the statistics of all ranks' batches (see module doc)."""
    if not ctx.active:
        return
    for name, s in observer.acc.sums.items():
        all_reduce_(ctx, s, "max" if name == "max_activation" else "sum")
    tokens = torch.tensor([observer.acc.tokens], dtype=torch.float64)
    observer.acc.tokens = int(all_reduce_(ctx, tokens).item())
    for obs in observer.extra:
        if obs is capture:
            continue
        for attr, value in list(vars(obs).items()):
            if attr in ("layer", "token_domain", "options"):
                continue
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.dtype == torch.int64):
                setattr(obs, attr, all_reduce_padded(ctx, value))
            elif attr == "count" and isinstance(value, int):
                obs.count = int(all_reduce_(ctx, torch.tensor([value], dtype=torch.float64)).item())
    if capture is not None:
        doms = capture.domain_chunks if capture.domain_chunks is not None else [None] * len(capture.chunks)
        mine = list(zip(local_batches or [], capture.chunks, doms))
        every = sorted((t for part in all_gather_object(ctx, mine) for t in part), key=lambda x: x[0])
        capture.chunks = [c for _, c, _ in every]
        gathered = [d for _, _, d in every]
        capture.domain_chunks = None if any(d is None for d in gathered) else gathered
