"""Bounded-memory loading: a model skeleton without weights, each decoder layer read from the safetensors
shards just before the calibration runner needs it and dropped right after.

`LazyCheckpoint(path)` builds the model from its config with every parameter on the ``meta`` device (no
memory; buffers such as rotary frequencies stay real, they are small and some are not in the checkpoint),
reads the parameters outside the decoder layers (embeddings, final norm; the LM head is left on meta: the
runner never computes logits), and acts as the runner's `LayerSource`: ``load(i)`` materialises decoder layer
i on the device, ``release(i)`` puts its parameters back on meta. Peak memory is therefore the non-layer
weights + one decoder layer + the runner's activations, whatever the size of the checkpoint; `peak_bytes`
counts the bytes materialised at once.

Checkpoint key names. `save_pretrained` writes hub-style names with one tensor per expert, e.g. Mixtral
``model.layers.0.block_sparse_moe.experts.3.w1.weight`` or Qwen/DeepSeek/OLMoE
``model.layers.0.mlp.experts.3.gate_proj.weight``, while transformers 5 holds the experts fused
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``). transformers converts them
with its weight-conversion machinery at load time; here the family's spec gives the renames and the
per-expert leaf names (`ArchSpec.disk`, models/archs.py) and the reader stacks the experts itself, each into its
slice of the fused tensor as the family's `ExpertLayout` places it (`ArchSpec.hub_split`; transformers 5's
default: expert e's gate goes to ``gate_up_proj[e, :I]``, its up to ``gate_up_proj[e, I:]``, its down to
``down_proj[e]``). A key already in transformers' fused form (gpt_oss's hub format, or a checkpoint written
with ``save_original_format=False``) is read as is. Quantised checkpoints (FP8 scales, MXFP4 blocks)
are not supported: a missing key is a `UserError`.

Tensors are read with plain file reads straight into their destination (for experts, into their slice of the
fused tensor), not through a memory map, so nothing of the checkpoint stays mapped in the process; before
each layer is read, the C heap is trimmed (glibc ``malloc_trim``) so that the previous layer's memory really
goes back to the OS.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch

from moe_compress.errors import UserError
from moe_compress.models.registry import Adapter, get_adapter
from moe_compress.models.source import LayerSource

if TYPE_CHECKING:
    import ctypes


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers is moved to the meta device (buffers stay where they are)."""
    old = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        old(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            assert p is not None  # registered just above
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    # the class's method is replaced for the duration of the block (setattr: mypy rejects assigning a method)
    setattr(torch.nn.Module, "register_parameter", register)
    try:
        yield
    finally:
        setattr(torch.nn.Module, "register_parameter", old)


class SafetensorsFolder:
    """The tensors of a folder of .safetensors shards: name -> (file, dtype, shape, byte range), from the file
    headers only. `read` copies one tensor from disk into a given (or new) tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"no .safetensors weights in {folder}")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for f in files:
            try:  # a damaged or truncated download must be a clear error, not a huge allocation or a KeyError
                size = f.stat().st_size
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                    if not 0 < n <= size - 8:
                        raise ValueError("its header length points beyond the end of the file")
                    header = json.loads(fh.read(n))
                for key, info in header.items():
                    if key == "__metadata__":
                        continue
                    begin, end = info["data_offsets"]
                    if 8 + n + end > size:
                        raise ValueError(f"tensor {key} ends beyond the end of the file (truncated?)")
                    self.entries[key] = (f, info["dtype"], tuple(info["shape"]), 8 + n + begin, end - begin)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"cannot read the weights file {f}: {e}; the file is damaged or incomplete, "
                                "download the checkpoint again") from None

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][2]

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype of ``key`` (None for a dtype torch cannot read here)."""
        return _DTYPES.get(self.entries[key][1])

    def read(self, key: str, out: torch.Tensor | None = None, device="cpu", dtype=None) -> torch.Tensor:
        """Tensor ``key``; written into ``out`` (any device/dtype, same shape) when given."""
        path, code, shape, offset, nbytes = self.entries[key]
        if code not in _DTYPES:
            raise UserError(f"{path.name}: tensor {key} has dtype {code}, which is not supported (quantised "
                            "checkpoints cannot be read layer by layer)")
        src_dtype = _DTYPES[code]
        target = out if out is not None else torch.empty(shape, dtype=dtype or src_dtype, device=device)
        if tuple(target.shape) != shape:
            raise UserError(f"{path.name}: tensor {key} has shape {list(shape)}, the model expects "
                            f"{list(target.shape)}")
        direct = target.device.type == "cpu" and target.dtype == src_dtype and target.is_contiguous()
        buf = target if direct else torch.empty(shape, dtype=src_dtype)
        if nbytes:
            with open(path, "rb") as fh:
                fh.seek(offset)
                # an ndarray is a buffer; numpy's stubs declare __buffer__ only for Python >= 3.12
                view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
                if fh.readinto(view) != nbytes:
                    raise UserError(f"{path.name} is truncated (tensor {key})")
        if not direct:
            target.copy_(buf)
        return target


def _return_freed_memory() -> None:
    """Ask glibc to return freed heap memory to the OS (``malloc_trim``). Without it, freed layers of a few
    tens of MB stay in the heap as fragments and resident memory creeps up layer after layer. No-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | Literal[False] | None = None  # None: not tried yet; False: no glibc here


class LazyCheckpoint(LayerSource):
    """A local safetensors checkpoint opened for layer-by-layer use (see the module docstring).

    ``model``: the skeleton (meta parameters, real embeddings/final norm); ``adapter``: its `Adapter`;
    ``live_bytes`` / ``peak_bytes``: bytes of parameters materialised now / at most at once (non-layer weights
    included); ``layer_bytes``: bytes of each decoder layer once materialised.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(path)
        try:
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the config of {path}: {str(e).splitlines()[0]}") from e
        self.adapter: Adapter = get_adapter(config)
        self.names = self.adapter.spec.disk
        if dtype in (None, "auto"):
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.dtype = dtype
        self.files = SafetensorsFolder(self.path)
        with params_on_meta():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                          trust_remote_code=trust_remote_code).eval()
        self.adapter = get_adapter(self.model)
        self.layers = self.adapter.decoder_layers(self.model)
        self._prefix = self._layers_prefix()
        self._disk_keys = {self.names.to_memory(k): k for k in self.files.keys()}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.layer_bytes: dict[int, int] = {}
        self._load_outside_layers()

    # -- names ------------------------------------------------------------------------------------------------
    def _layers_prefix(self) -> str:
        for name, module in self.model.named_modules():
            if module is self.layers:
                return name + "."
        raise UserError("cannot locate the decoder layers of this model")

    def _read_into(self, mem_key: str, target: torch.Tensor) -> bool:
        """Read the tensor stored (under the disk name of ``mem_key``) into ``target``; False if absent."""
        disk = self._disk_keys.get(mem_key)
        if disk is None:
            return False
        self.files.read(disk, out=target)
        return True

    def _read_experts(self, mem_key: str, target: torch.Tensor) -> bool:
        """Read per-expert hub tensors into their slices of a fused ``...experts.gate_up_proj`` / ``down_proj``
        (+ biases) target (`ArchSpec.hub_split`); False if this entry is not stored per expert or one is absent."""
        parts = self.adapter.spec.hub_split(mem_key, target)
        if parts is None or not all(key in self.files for key, _ in parts):
            return False
        for key, view in parts:
            self.files.read(key, out=view)
        return True

    def _materialise(self, module: torch.nn.Module, prefix: str, device) -> dict[str, torch.Tensor]:
        """Real tensors for every parameter and persistent buffer of ``module`` (state-dict names)."""
        out, missing = {}, []
        for name, ref in module.state_dict(keep_vars=True).items():
            mem_key = prefix + name
            target = torch.empty(ref.shape, dtype=ref.dtype, device=device)
            if not (self._read_into(mem_key, target) or self._read_experts(mem_key, target)):
                if ref.device.type != "meta":  # a real buffer the checkpoint does not hold: keep its value
                    target.copy_(ref)
                else:
                    missing.append(mem_key)
            out[name] = target
        if missing:
            raise UserError(f"{self.path}: the checkpoint has no tensor for {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                            + "; only unquantised safetensors checkpoints can be read layer by layer")
        return out

    def _load_outside_layers(self) -> None:
        """Materialise (on CPU) every parameter and persistent buffer outside the decoder layers, except the LM
        head (the runner never computes logits)."""
        for key, ref in self.model.state_dict(keep_vars=True).items():
            if key.startswith(self._prefix) or key.startswith("lm_head."):
                continue
            target = torch.empty(ref.shape, dtype=ref.dtype)
            if not self._read_into(key, target):
                if ref.device.type != "meta":
                    continue  # a real buffer the checkpoint does not hold: keep it
                raise UserError(f"{self.path}: the checkpoint has no tensor for {key}")
            module_name, _, leaf = key.rpartition(".")
            module = self.model.get_submodule(module_name)
            if leaf in module._parameters:
                module._parameters[leaf] = torch.nn.Parameter(target, requires_grad=False)
            else:
                module._buffers[leaf] = target
            self._count(target.numel() * target.element_size())

    def _count(self, delta: int) -> None:
        self.live_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    # -- LayerSource ------------------------------------------------------------------------------------------
    def load(self, index: int, layer: torch.nn.Module, device) -> None:
        _return_freed_memory()  # the previous layer is gone by now: give its pages back before reading the next
        tensors = self._materialise(layer, f"{self._prefix}{index}.", device)
        layer.load_state_dict(tensors, strict=True, assign=True)
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        self.layer_bytes[index] = n
        self._count(n)

    def release(self, index: int, layer: torch.nn.Module, offload_device) -> None:
        """Parameters back to meta (their memory is freed once nothing else refers to them); buffers are small
        and stay."""
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in layer.named_parameters()}
        layer.load_state_dict(meta, strict=False, assign=True)
        self._count(-self.layer_bytes.get(index, 0))

    @property
    def layer_prefix(self) -> str:
        """The in-memory state-dict prefix of the decoder layers (``model.layers.``): layer i's keys start with
        ``f"{layer_prefix}{i}."``."""
        return self._prefix

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint outside the decoder layers (embeddings, final norm, LM head, ...), by
        its on-disk name in sorted order; floating-point ones in the model's dtype, the others as stored."""
        layers = self.names.to_disk(self._prefix)
        out = {}
        for key in sorted(self.files.keys()):
            if key.startswith(layers):
                continue
            stored = self.files.dtype(key)
            floating = stored is not None and stored.is_floating_point
            out[key] = self.files.read(key, dtype=self.dtype if floating else None).contiguous()
        return out

    def checkpoint_bytes(self) -> int:
        """Total bytes of the tensors in the checkpoint files."""
        return sum(e[4] for e in self.files.entries.values())


def write_random_checkpoint(config, folder: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            std: float = 0.02) -> Path:
    """Write a random-weight checkpoint of ``config`` with hub-style names, one shard per decoder layer, never
    holding more than one layer in memory (for memory benchmarks of models larger than RAM).

    Weights ~ N(0, std); norm weights 1; biases and DeepSeek correction biases 0."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(model)
    spec, names = adapter.spec, adapter.spec.disk
    layers = adapter.decoder_layers(model)
    gen = torch.Generator().manual_seed(seed)

    def value(name: str, ref: torch.Tensor) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            return torch.ones(ref.shape, dtype=dtype)
        if leaf.endswith("bias") or leaf in ("sinks",):
            return torch.zeros(ref.shape, dtype=ref.dtype if ref.dtype.is_floating_point else dtype)
        return (torch.randn(ref.shape, generator=gen) * std).to(dtype)

    def disk_tensors(prefix: str, module) -> dict[str, torch.Tensor]:
        out = {}
        for name, ref in module.state_dict(keep_vars=True).items():
            key = prefix + name
            t = value(key, ref)
            parts = spec.hub_split(key, t)
            if parts is None:
                out[names.to_disk(key)] = t.contiguous()
            else:
                out.update((k, v.clone()) for k, v in parts)
        return out

    layers_name = next(n for n, m in model.named_modules() if m is layers)
    outside = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(layers_name + ".")}
    rest = {names.to_disk(key): value(key, ref) for key, ref in outside.items()
            if not (key.startswith("lm_head.") and getattr(config, "tie_word_embeddings", False))}
    n_files = len(layers) + 1
    weight_map = {}
    for i in range(n_files):
        fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        tensors = rest if i == len(layers) else disk_tensors(f"{layers_name}.{i}.", layers[i])
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
        del tensors
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    return folder
