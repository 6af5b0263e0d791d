"""The quantization strategy interface, the drop-in quantized linear, and the registry of formats.

A strategy replaces every `Linear` of a built model (plain, QKV- or gate/up-packed) by a `QuantizedLinear`
with the same `forward(x)`; model files do not change. The quantized linear declares the tensors the
checkpoint stores (e.g. qweight/qzeros/scales/g_idx), each with its own `weight_loader` that writes a packed
shard into the right output slice; once every tensor is in, `process_weights_after_loading` turns them into
the compute format (int8/int4 packed for PyTorch's CPU ops, or a dequantized float weight).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tgi_backend.layers.linear import Linear


class QuantizedLinear(nn.Module):
    """A drop-in for `Linear`/`PackedLinear`: same in/out features, shard offsets and `forward(x)`.

    Subclasses declare checkpoint tensors with `add_tensor` and implement `finalize` (load -> compute format)
    and `matmul` (x -> x @ W.T in the compute format).
    """

    def __init__(self, base: Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.shard_offsets: dict[Any, tuple[int, int]] = dict(
            getattr(base, "shard_offsets", None) or {None: (0, base.out_features)}
        )
        for attr in ("q_size", "kv_size"):  # QKVLinear's split sizes
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        self.dtype = base.weight.dtype  # the model's compute dtype
        self.has_bias = base.bias is not None
        # some tools (AutoGPTQ) save a zero bias for every linear: accept it, drop it if it is all zeros
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self.dtype), requires_grad=False)
        self.add_tensor("bias", self.bias, out_dim=0, pack=1, optional=not self.has_bias)

    # ---- declaring checkpoint tensors ----------------------------------------------------------------
    def add_tensor(
        self, name: str, param: nn.Parameter, out_dim: int | None, pack: int = 1, optional: bool = False,
        loader: Callable[..., None] | None = None,
    ) -> nn.Parameter:
        """out_dim: the dimension along which packed shards are stacked (None: same for every shard);
        pack: output columns per stored element along out_dim (8 for int4 packed in int32)."""
        setattr(self, name, param)
        param.optional = optional
        param.weight_loader = loader or (lambda p, t, shard_id=None: self._load_slice(p, t, shard_id, out_dim, pack))
        return param

    def _load_slice(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any, out_dim: int | None, pack: int
    ) -> None:
        target = param.data
        if out_dim is not None and shard_id is not None:  # None: the whole tensor (plain, or stored packed)
            offset, size = self.shard_offsets[shard_id]
            if offset % pack or size % pack:
                raise ValueError(f"shard {shard_id!r}: {size} columns do not pack by {pack}")
            target = target.narrow(out_dim, offset // pack, size // pack)
        if loaded.dim() == 0 or (loaded.numel() == 1 and target.numel() > 1):  # per-tensor scale of a shard
            target.fill_(loaded.reshape(()).item())
            return
        if loaded.numel() == target.numel() and loaded.dim() != target.dim():  # [out, 1] scales
            loaded = loaded.reshape(target.shape)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"shard {shard_id!r}: expected {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}"
            )
        target.copy_(loaded)

    def shard_slices(self) -> list[tuple[Any, int, int]]:
        return [(sid, off, size) for sid, (off, size) in self.shard_offsets.items()]

    # ---- after loading ---------------------------------------------------------------------------
    def process_weights_after_loading(self) -> None:
        self.finalize()
        if not self.has_bias and not torch.any(self.bias.data):
            self.bias = None
        elif self.bias is not None:
            self.bias = nn.Parameter(self.bias.data.to(self.dtype), requires_grad=False)

    @abstractmethod
    def finalize(self) -> None: ...

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]
        y = self.matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return qkv.split([size for _, size in self.shard_offsets.values()], dim=-1)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32: what the layer multiplies by (tests compare against it)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        bias, self.bias = self.bias, None
        try:
            return self.matmul(eye.to(self.dtype)).float().T.contiguous()
        finally:
            self.bias = bias


class QuantStrategy(ABC):
    """One checkpoint format: which modules it quantizes and the linear it builds for each."""

    name: str = ""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.skip: tuple[str, ...] = tuple(config.get("modules_to_not_convert") or ())

    @abstractmethod
    def build(self, base: Linear) -> QuantizedLinear: ...

    # checkpoint tensor names that mark a module stored quantized; empty: quantized on the fly (every Linear)
    markers: tuple[str, ...] = ()
    requires_markers = True  # False: a checkpoint without markers is float, quantized on the fly (fp8)

    def apply(self, model: nn.Module, model_path: str | None = None) -> int:
        """Replaces each Linear (the LM head and embeddings are not Linear) in place; returns how many.

        With model_path, only the linears the checkpoint stores quantized (a MoE router, a module in
        `modules_to_not_convert` stay float); a checkpoint with no marker at all is float: all, on the fly.
        """
        stored = self._quantized_modules(model_path) if model_path and self.markers else None
        packed: dict[str, list[str]] = {}
        for ckpt_key, (param_key, _) in getattr(model, "packed_modules_mapping", {}).items():
            packed.setdefault(param_key, []).append(ckpt_key)
        replaced = 0
        for path, module in list(model.named_modules()):
            parent_path, _, leaf = path.rpartition(".")
            if not isinstance(module, Linear) or leaf in ROUTERS or any(s and s in path for s in self.skip):
                continue
            names = [path] + [f"{parent_path}.{ck}" if parent_path else ck for ck in packed.get(leaf, [])]
            if stored is not None and not any(n in stored for n in names):
                continue
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, self.build(module))
            replaced += 1
        return replaced

    def _quantized_modules(self, model_path: str) -> set[str] | None:
        from safetensors import safe_open

        from tgi_backend.weights.loader import safetensors_files

        found: set[str] = set()
        for file in safetensors_files(model_path):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    module, _, tensor = name.rpartition(".")
                    if tensor in self.markers:
                        found.add(module)
        if not found and self.requires_markers:
            raise ValueError(f"the checkpoint has no {self.name} tensors ({', '.join(self.markers)})")
        return found or None


ROUTERS = ("gate", "shared_expert_gate")  # MoE routers stay float, as in TGI and vLLM
STRATEGIES: dict[str, type[QuantStrategy]] = {}

# TGI's --quantize names -> our strategy; None: take the format from config.json's quantization_config
TGI_QUANTIZE: dict[str, str | None] = {
    "gptq": "gptq", "marlin": "gptq", "exllama": "gptq", "awq": "awq",
    "eetq": "int8", "bitsandbytes": "int8", "bitsandbytes-nf4": "int4", "bitsandbytes-fp4": "int4",
    "fp8": "fp8", "compressed-tensors": "fp8",
}


def register(cls: type[QuantStrategy]) -> type[QuantStrategy]:
    STRATEGIES[cls.name] = cls
    return cls


def _import_formats() -> None:
    from tgi_backend.layers.quantization import awq, fp8, gptq, int8  # noqa: F401  (they register)


def strategy_for(quantize: str | None, hf_config: Mapping[str, Any]) -> QuantStrategy | None:
    """The strategy for --quantize (TGI's names) or the checkpoint's quantization_config; None: plain."""
    _import_formats()
    qcfg = dict(hf_config.get("quantization_config") or {})
    method = str(qcfg.get("quant_method") or "").lower() or None
    if quantize:
        if quantize not in TGI_QUANTIZE:
            raise ValueError(f"--quantize must be one of {', '.join(sorted(TGI_QUANTIZE))}, got {quantize!r}")
        wanted = TGI_QUANTIZE[quantize]
        if method in ("gptq", "awq") and wanted != method:
            raise ValueError(f"the checkpoint is {method}-quantized; --quantize {quantize} does not apply")
        name = wanted
    else:
        name = {"compressed-tensors": "fp8"}.get(method or "", method)
    if name is None:
        return None
    if name not in STRATEGIES:
        raise ValueError(f"unsupported quantization format {name!r}; supported: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](qcfg if method else {})
