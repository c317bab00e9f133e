"""Merge LoRA weights into a loaded ``WanModel`` (and take them out again).

Formats read (one ``.safetensors`` file, or a PEFT folder with ``adapter_config.json``):

* official / lightx2v / kohya: ``<module>.lora_down.weight``, ``<module>.lora_up.weight``, optional
  ``<module>.alpha``; full deltas ``<module>.diff`` (weight) and ``<module>.diff_b`` (bias), which
  lightx2v uses for norms, biases and modulation tables (a ``.diff`` on a parameter such as
  ``blocks.N.modulation`` applies to that parameter);
* diffusers / PEFT: ``<module>.lora_A.weight``, ``<module>.lora_B.weight`` (``lora_A.default.weight``
  too), ``<module>.lora_B.bias`` (PEFT ``lora_bias``, scaled like the product); alpha from ``adapter_config.json`` (``lora_alpha``/``r``) when given, else alpha = rank.

``<module>`` may use official or diffusers names, with an optional prefix (``diffusion_model.``,
``model.diffusion_model.``, ``transformer.``, ``base_model.model.``, DiffSynth's ``pipe.dit.``) or
the underscore style of kohya (``lora_unet_blocks_0_self_attn_q``), VideoX-Fun (``lora_unet__``),
LyCORIS (``lycoris_``) and diffusers' kohya names (``lora_transformer_blocks_0_attn1_to_q``).
lightx2v's ``blocks.N.diff_m`` is a full delta of ``blocks.N.modulation``. Every key must land on a parameter of the model: one that
does not is an error naming it, and nothing is changed.

Merging: ``W += scale * (alpha / rank) * up @ down``, ``W += scale * diff``, ``b += scale * diff_b``,
computed in float32 and written back in the parameter's dtype, one parameter at a time; under
FSDP2 each rank updates its own shard. ``unmerge_lora`` restores the exact original tensors: re-read from the checkpoint file
when the model came from ``load_transformer``, else from CPU copies taken at the first merge.

fp8 layers (``wan_model.fp8.Fp8Linear``) hold only the quantized weight, so a LoRA is merged into the
original weight re-read from the checkpoint file and the sum is quantized again: the result is what
quantizing a checkpoint with the LoRA merged would give. Such layers take one LoRA at a time.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from .config import VariantSpec
from .keymap import official_to_diffusers_name
from .loader import local_part

__all__ = ["LoraError", "LoraUpdate", "read_lora", "merge_lora", "unmerge_lora", "merged_loras"]

# Longest first: "lora_unet__" (VideoX-Fun) must win over kohya's "lora_unet_".
_PREFIXES = tuple(sorted(
    ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "pipe.dit.",
     "lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_"),
    key=len, reverse=True))
_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_B.bias": "up_bias",  # PEFT lora_bias (diffusers converts lightx2v diff_b to it)
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".diff_m": "diff_m",  # lightx2v: a full delta of the block's modulation table
}


class LoraError(ValueError):
    """A LoRA that cannot be applied to this model (names the offending keys)."""


@dataclass
class LoraUpdate:
    """Everything a LoRA file holds for one module (official name) of the model."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------------


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], float | None]:
    """Tensors of a LoRA file (or PEFT folder) and the PEFT ``lora_alpha / r`` ratio's alpha, if any."""
    default_alpha = None
    if path.is_dir():
        config = path / "adapter_config.json"
        if config.is_file():
            default_alpha = _peft_alpha(json.loads(config.read_text()), str(config))
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraError(f"{path}: expected one .safetensors LoRA file, found {[f.name for f in files]}")
        path = files[0]
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as err:
        raise LoraError(f"cannot read LoRA file {path}: {err}") from err
    # diffusers' save_lora_weights / save_lora_adapter keep the PEFT config in the file's metadata,
    # unprefixed or under the component's name ("transformer.lora_alpha").
    raw = metadata.get("lora_adapter_metadata")
    if default_alpha is None and raw:
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise LoraError(f"{path}: its lora_adapter_metadata is not JSON ({err})") from None
        if any(key.startswith("transformer.") for key in data):
            data = {key.removeprefix("transformer."): value for key, value in data.items()
                    if key.startswith("transformer.")}
        default_alpha = _peft_alpha(data, f"{path} (lora_adapter_metadata)")
    return tensors, default_alpha


def _peft_alpha(config: dict, where: str) -> float | None:
    """``lora_alpha`` of a PEFT LoRA config; the variants this merge cannot reproduce are refused."""
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoraError(f"{where}: rslora / per-module rank or alpha patterns are not supported")
    return config.get("lora_alpha")


def _module_lookup(model: nn.Module) -> dict[str, str]:
    """Every way a LoRA may spell a target (official, diffusers, kohya underscores) -> official name."""
    lookup: dict[str, str] = {}
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    for name in names:
        lookup[name] = name
        lookup[name.replace(".", "_")] = name
    for name in names:
        diffusers_name = official_to_diffusers_name(name)
        if diffusers_name is not None:
            lookup.setdefault(diffusers_name, name)
            lookup.setdefault(diffusers_name.replace(".", "_"), name)
    return lookup


def _split_key(key: str) -> tuple[str, str] | None:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix, kind in sorted(_SUFFIXES.items(), key=lambda item: -len(item[0])):
        if key.endswith(suffix):
            if kind == "diff_m":  # "blocks.3.diff_m" is blocks.3.modulation's "diff"
                return key[: -len(suffix)] + ".modulation", "diff"
            return key[: -len(suffix)], kind
    return None


def read_lora(
    model: nn.Module, lora: str | Path | Mapping[str, torch.Tensor], *, alpha: float | None = None
) -> dict[str, LoraUpdate]:
    """Parse and check a LoRA against ``model``: official target name -> ``LoraUpdate``. Changes nothing.

    ``alpha`` overrides the file's alpha (and PEFT's ``lora_alpha``) for every module.
    """
    if isinstance(lora, Mapping):
        tensors, default_alpha = dict(lora), None
    else:
        tensors, default_alpha = _load_file(Path(lora))
    if not tensors:
        raise LoraError("the LoRA holds no tensors")
    lookup = _module_lookup(model)
    updates: dict[str, LoraUpdate] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        target = lookup.get(split[0]) if split else None
        if target is None:
            unknown.append(key)
            continue
        update = updates.setdefault(target, LoraUpdate())
        kind = split[1]
        setattr(update, kind, tensor.item() if kind == "alpha" else tensor)
        update.keys.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        raise LoraError(f"{len(unknown)} LoRA key(s) match no parameter of the model: {shown}")
    for target, update in updates.items():
        if (update.down is None) != (update.up is None) or (update.up_bias is not None and update.up is None):
            raise LoraError(f"LoRA for {target} has only one of down/up (A/B): {update.keys}")
        if update.down is not None:
            if update.down.shape[0] != update.up.shape[1]:
                raise LoraError(f"LoRA for {target}: rank mismatch, down {tuple(update.down.shape)} up {tuple(update.up.shape)}")
            if alpha is not None:
                update.alpha = alpha
            elif update.alpha is None and default_alpha is not None:
                update.alpha = float(default_alpha)
    return updates


# --- merging ---------------------------------------------------------------------------------------


@dataclass
class _Planned:
    """One parameter a LoRA changes; ``delta()`` builds its float32 update (before ``scale``) on demand."""

    name: str
    param: torch.Tensor
    parts: list[tuple[float, torch.Tensor | None, torch.Tensor]]  # (factor, up or None, down or full delta)

    def delta(self) -> torch.Tensor:
        device = self.param.device
        total = torch.zeros(self.param.shape, dtype=torch.float32, device=device)
        for factor, up, value in self.parts:
            if up is not None:
                product = up.to(device, torch.float32).flatten(1) @ value.to(device, torch.float32).flatten(1)
                total += factor * product.reshape(self.param.shape)
            else:
                total += factor * value.to(device, torch.float32)
        return total


def _fp8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Weight name -> the ``Fp8Linear`` that holds that weight quantized."""
    from .fp8 import Fp8Linear

    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, Fp8Linear)}


def _mergeable(model: nn.Module, fp8: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every tensor a LoRA may change, by name: the parameters, and for the fp8 layers ``fp8``
    (``_fp8_layers``) their bias and (as a stand-in giving shape and device) their quantized weight."""
    tensors = dict(model.named_parameters())
    for weight_name, layer in fp8.items():
        tensors[weight_name] = layer.weight_fp8
        if layer.bias is not None:
            tensors[weight_name.removesuffix("weight") + "bias"] = layer.bias
    return tensors


def _targets(params: dict[str, torch.Tensor], name: str, update: LoraUpdate) -> list[_Planned]:
    """The tensors (of ``_mergeable``) one module's update changes, with every shape checked (no delta built yet)."""
    if name in params:  # a bare parameter such as blocks.N.modulation: only full deltas make sense
        if update.down is not None or update.diff_b is not None or update.up_bias is not None:
            raise LoraError(f"{name} is a parameter, not a layer: only .diff applies to it ({update.keys})")
        weight_name, bias_name = name, None
    else:
        weight_name, bias_name = f"{name}.weight", f"{name}.bias"
    out = []
    weight = params.get(weight_name)
    rank = update.down.shape[0] if update.down is not None else 1
    lora_factor = (update.alpha if update.alpha is not None else rank) / rank  # alpha / rank, alpha defaults to rank
    if update.down is not None or update.diff is not None:
        if weight is None:
            raise LoraError(f"LoRA targets {name}, which has no weight ({update.keys})")
        parts = []
        if update.down is not None:
            up_shape, down_shape = update.up.flatten(1).shape, update.down.flatten(1).shape
            if up_shape[1] != down_shape[0]:
                raise LoraError(f"LoRA for {name}: up {tuple(up_shape)} and down {tuple(down_shape)} do not multiply")
            if (up_shape[0], down_shape[1]) != (weight.shape[0], math.prod(weight.shape[1:])):
                raise LoraError(f"LoRA for {name} gives a {(up_shape[0], down_shape[1])} update for a "
                                f"{tuple(weight.shape)} weight")
            parts.append((lora_factor, update.up, update.down))
        if update.diff is not None:
            if update.diff.shape != weight.shape:
                raise LoraError(f"{name}.diff has shape {tuple(update.diff.shape)}, the weight {tuple(weight.shape)}")
            parts.append((1.0, None, update.diff))
        out.append(_Planned(weight_name, weight, parts))
    if update.diff_b is not None or update.up_bias is not None:
        bias = params.get(bias_name) if bias_name else None
        if bias is None:
            raise LoraError(f"a bias delta is given for {name}, which has no bias ({update.keys})")
        parts = []
        for label, value, factor in (("diff_b", update.diff_b, 1.0), ("lora_B.bias", update.up_bias, lora_factor)):
            if value is None:
                continue
            if value.shape != bias.shape:
                raise LoraError(f"{name}.{label} has shape {tuple(value.shape)}, the bias {tuple(bias.shape)}")
            parts.append((factor, None, value))
        out.append(_Planned(bias_name, bias, parts))
    return out


def _local(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``param``: its shard under FSDP2 (a DTensor), else the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    lora: str | Path | Mapping[str, torch.Tensor],
    scale: float = 1.0,
    *,
    alpha: float | None = None,
) -> list[str]:
    """Add ``lora`` (file, PEFT folder or state dict) times ``scale`` into ``model``'s weights.

    Checks the whole LoRA first (unknown keys, shapes) and changes nothing if any check fails.
    Then builds each parameter's update one at a time (a LoRA on every layer of a 14B model would
    need tens of GB as deltas all at once). Under FSDP2 every rank adds its own shard of each
    update. Several merges stack; ``unmerge_lora`` undoes them all. Returns the parameter names changed.
    """
    updates = read_lora(model, lora, alpha=alpha)
    fp8 = _fp8_layers(model)
    tensors = _mergeable(model, fp8)  # once: walking the model for each updated module is quadratic
    planned = [t for name, update in updates.items() for t in _targets(tensors, name, update)]

    originals: dict[str, torch.Tensor | None] = getattr(model, "_lora_originals", {})
    source = getattr(model, "checkpoint_source", None)
    fp8_targets = [t.name for t in planned if t.name in fp8]
    if fp8_targets and source is None:
        raise LoraError("this model runs fp8 GEMMs and was not loaded from a checkpoint file: a LoRA merges into "
                        f"the original weights, re-read from the file ({fp8_targets[0]})")
    stacked = [name for name in fp8_targets if name in originals]
    if stacked:
        raise LoraError(f"fp8 layers take one LoRA at a time; unmerge the one merged first ({stacked[0]})")
    for target in planned:
        layer = fp8.get(target.name)
        if layer is not None:  # merge into the original weight, then quantize again
            originals[target.name] = None
            original = source.read(target.name, target.param.device)
            layer.set_weight((original.float() + scale * target.delta()).to(original.dtype))
            continue
        local = _local(target.param)
        if target.name not in originals:
            # Loaded models re-read their originals from the file; others keep an exact CPU copy.
            originals[target.name] = None if source is not None else local.detach().to("cpu", copy=True)
        delta = local_part(target.param, target.delta())
        local.copy_((local.float() + scale * delta).to(local.dtype))
        del delta
    model._lora_originals = originals
    model._lora_merged = [*getattr(model, "_lora_merged", []), (str(lora) if not isinstance(lora, Mapping) else "<state dict>", scale)]
    return [target.name for target in planned]


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> list[str]:
    """Restore every parameter any merged LoRA touched to its exact original value; returns their names."""
    originals: dict[str, torch.Tensor | None] = getattr(model, "_lora_originals", {})
    fp8 = _fp8_layers(model)
    params = _mergeable(model, fp8)
    source = getattr(model, "checkpoint_source", None)
    for name, original in originals.items():
        if name in fp8:
            fp8[name].set_weight(source.read(name, params[name].device))
            continue
        param = params[name]
        local = _local(param)
        if original is None:
            original = local_part(param, source.read(name, local.device))
        local.copy_(original)
    model._lora_originals = {}
    model._lora_merged = []
    return list(originals)


def merged_loras(model: nn.Module) -> list[tuple[str, float]]:
    """The LoRAs currently merged into ``model``, as (source, scale), in merge order."""
    return list(getattr(model, "_lora_merged", []))


# --- which files, for which expert ---------------------------------------------------------------


def lora_stamp(path: str) -> tuple:
    """(name, size, mtime) of the LoRA's files, so that a replaced file does not stay merged."""
    try:
        if os.path.isfile(path):
            stat = os.stat(path)
            return ((path, stat.st_size, stat.st_mtime_ns),)
        found = []
        for root, _, names in os.walk(path):
            for name in names:
                stat = os.stat(os.path.join(root, name))
                found.append((os.path.join(root, name), stat.st_size, stat.st_mtime_ns))
        return tuple(sorted(found))
    except OSError:
        return ()


def _is_peft_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def expert_lora_files(path: str, variant: VariantSpec) -> dict[str, str]:
    """expert -> LoRA file or PEFT folder (``adapter_config.json`` + weights: its ``lora_alpha`` is
    read there); raises ``ValueError`` naming the problem. Only safetensors files are read. A file or
    PEFT folder applies to every expert; any other folder holds one per A14B expert (its name contains
    the expert name, e.g. ``high_noise_model.safetensors``)."""
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        raise ValueError(f"LoRA file {os.path.basename(path)} is not a .safetensors file (the only format read)")
    if os.path.isfile(path) or _is_peft_folder(path):
        return {name: path for name in variant.experts}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") or _is_peft_folder(os.path.join(path, f)))
    if not variant.is_moe:
        if len(files) != 1:
            raise ValueError(f"LoRA folder {path} must hold exactly one weights file for {variant.name}, has {files}")
        return {variant.experts[0]: os.path.join(path, files[0])}
    chosen = {}
    for name in variant.experts:
        matches = [f for f in files if name in f]
        if len(matches) != 1:
            raise ValueError(f"LoRA folder {path}: expected one file naming expert {name!r}, found {matches}")
        chosen[name] = os.path.join(path, matches[0])
    return chosen
