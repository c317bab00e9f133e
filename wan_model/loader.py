"""Load (and save) Wan transformer weights: official or diffusers layout, one file or sharded.

Loading builds the model on the ``meta`` device and then assigns the checkpoint's tensors one by
one, each read from the memory-mapped safetensors file straight onto the target device and
converted to the target dtype, so the host never holds a second full copy of the weights.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import VARIANTS, WanConfig, get_variant
from .keymap import detect_layout, diffusers_to_official_name, official_to_diffusers, strip_prefix
from .model import WanModel

__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "load_transformer",
    "save_transformer",
    "checkpoint_files",
    "read_checkpoint_keys",
    "config_from_json",
    "config_from_shapes",
    "config_to_json",
    "detect_variant",
    "matching_variants",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
# Keys some diffusers checkpoints carry that the model never uses (diffusers ignores them too).
_IGNORED_DIFFUSERS_KEYS = ("norm_added_q",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing/unexpected keys, wrong shapes, unreadable files."""


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} key(s): {shown}" + (", ..." if len(keys) > limit else "")


# --- finding the files ---------------------------------------------------------------------------


def checkpoint_files(path: str | Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of a checkpoint and its ``config.json`` (or None).

    ``path`` is a ``.safetensors`` file, or a folder holding ``diffusion_pytorch_model*.safetensors``
    (sharded ones listed by ``*.safetensors.index.json``).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors checkpoints are supported")
        config = path.parent / "config.json"
        return [path], config if config.is_file() else None
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    config = path / "config.json"
    config = config if config.is_file() else None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several index files {[p.name for p in indexes]}; pass one weights file")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{indexes[0]}: not a valid safetensors index ({err})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{indexes[0]} lists shard files that do not exist: {absent}")
        return files, config
    files = sorted(path.glob(f"{WEIGHTS_NAME}*.safetensors"))
    if not files:
        hint = " (a diffusers pipeline folder? pass its transformer/ subfolder)" if (path / "transformer").is_dir() else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}*.safetensors files{hint}")
    if len(files) > 1:
        raise CheckpointError(f"{path}: several weight files {[f.name for f in files]} but no *.safetensors.index.json")
    return files, config


def _open(file: Path, device: str = "cpu"):
    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as err:  # safetensors raises its own error types for bad headers/truncation
        raise CheckpointError(f"cannot read safetensors file {file}: {err}") from err


def read_checkpoint_keys(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Official-layout name -> (file, key in the file, shape), for every tensor of the checkpoint."""
    raw: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with _open(file) as handle:
            for key in handle.keys():
                if key in raw:
                    raise CheckpointError(f"key {key} appears in both {raw[key][0]} and {file}")
                raw[key] = (file, tuple(handle.get_slice(key).get_shape()))
    stripped = {strip_prefix(k): k for k in raw}
    layout = detect_layout(stripped)
    entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for name, key in stripped.items():
        if layout == "diffusers":
            if any(part in name.split(".") for part in _IGNORED_DIFFUSERS_KEYS):
                continue
            name = diffusers_to_official_name(name) or name  # unknown names reported later as unexpected
        entries[name] = (raw[key][0], key, raw[key][1])
    return entries


# --- configs ---------------------------------------------------------------------------------------


def _model_type(in_dim: int, out_dim: int, image_dim: int | None) -> str:
    if image_dim is not None or in_dim == out_dim + 20:  # image branch, or 16 latent + 4 mask + 16 image channels
        return "i2v"
    return "ti2v" if out_dim == 48 else "t2v"


def _check_class(data: Mapping, supported: str, extra_keys: tuple[str, ...]) -> None:
    """Refuse the Wan family's other transformers (VACE, Animate, S2V): they share the base fields
    and would otherwise be taken for T2V/I2V, to fail later on hundreds of unexpected keys."""
    name = data.get("_class_name")
    found = [k for k in extra_keys if k in data]
    if (name is not None and name != supported) or found:
        raise CheckpointError(f"unsupported transformer {name or 'class'}{f' (config has {found})' if found else ''}: "
                              f"wanserve runs {supported} checkpoints (Wan T2V, I2V and TI2V)")


def config_from_json(data: Mapping, shapes: Mapping[str, tuple[int, ...]] | None = None) -> WanConfig:
    """A ``WanConfig`` from a diffusers (``WanTransformer3DModel``) or official (``WanModel``) config.json.

    ``shapes`` (official names) decide whether the image branch exists when the json does not say
    (official configs of Wan2.1 and Wan2.2 I2V both read ``model_type: i2v``; only 2.1 has ``img_emb``).
    """
    if "num_attention_heads" in data:  # diffusers
        _check_class(data, "WanTransformer3DModel", extra_keys=("vace_layers", "motion_encoder_size"))
        if data.get("pos_embed_seq_len"):
            raise CheckpointError("FLF2V checkpoints (pos_embed_seq_len) are not supported")
        heads, head_dim = int(data["num_attention_heads"]), int(data.get("attention_head_dim", 128))
        in_dim = int(data.get("in_channels", 16))
        out_dim = int(data.get("out_channels") or in_dim)
        image_dim = data.get("image_dim")
        return WanConfig(
            model_type=_model_type(in_dim, out_dim, image_dim),
            dim=heads * head_dim,
            ffn_dim=int(data.get("ffn_dim", 13824)),
            num_heads=heads,
            num_layers=int(data.get("num_layers", 40)),
            in_dim=in_dim,
            out_dim=out_dim,
            text_dim=int(data.get("text_dim", 4096)),
            freq_dim=int(data.get("freq_dim", 256)),
            patch_size=tuple(data.get("patch_size", (1, 2, 2))),
            eps=float(data.get("eps", 1e-6)),
            qk_norm=data.get("qk_norm", "rms_norm_across_heads") not in (None, False),
            cross_attn_norm=bool(data.get("cross_attn_norm", True)),
            image_dim=int(image_dim) if image_dim is not None else None,
        )
    if "dim" in data and "num_heads" in data:  # official
        _check_class(data, "WanModel", extra_keys=("vace_layers",))
        image_dim = data.get("image_dim")
        if image_dim is None and shapes is not None and "img_emb.proj.0.weight" in shapes:
            image_dim = shapes["img_emb.proj.0.weight"][0]
        in_dim, out_dim = int(data.get("in_dim", 16)), int(data.get("out_dim", 16))
        model_type = data.get("model_type") or _model_type(in_dim, out_dim, image_dim)
        if model_type not in ("t2v", "i2v", "ti2v"):
            raise CheckpointError(f"unsupported official model_type {model_type!r}")
        return WanConfig(
            model_type=model_type,
            dim=int(data["dim"]),
            ffn_dim=int(data.get("ffn_dim", 8960)),
            num_heads=int(data["num_heads"]),
            num_layers=int(data.get("num_layers", 32)),
            in_dim=in_dim,
            out_dim=out_dim,
            text_dim=int(data.get("text_dim", 4096)),
            freq_dim=int(data.get("freq_dim", 256)),
            text_len=int(data.get("text_len", 512)),
            patch_size=tuple(data.get("patch_size", (1, 2, 2))),
            eps=float(data.get("eps", 1e-6)),
            qk_norm=bool(data.get("qk_norm", True)),
            cross_attn_norm=bool(data.get("cross_attn_norm", True)),
            image_dim=int(image_dim) if image_dim is not None else None,
        )
    raise CheckpointError(f"config.json is neither a diffusers nor an official Wan transformer config: {sorted(data)}")


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> WanConfig:
    """A ``WanConfig`` from official-layout tensor shapes alone.

    The head count is not in the shapes; real Wan models all use head_dim 128, so ``dim // 128`` is
    taken, and any other width must come with a config.json.
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the model shape: the checkpoint has no {key}")
        return shapes[key]

    dim, in_dim, *patch = shape("patch_embedding.weight")
    if dim % 128:
        raise CheckpointError(f"cannot infer num_heads for dim {dim} (not a multiple of 128): add a config.json")
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"blocks are not numbered 0..N-1: {sorted(layers)}")
    image_dim = shapes["img_emb.proj.0.weight"][0] if "img_emb.proj.0.weight" in shapes else None
    out_dim = shape("head.head.weight")[0] // math.prod(patch)
    return WanConfig(
        model_type=_model_type(in_dim, out_dim, image_dim),
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0],
        num_heads=dim // 128,
        num_layers=len(layers),
        in_dim=in_dim,
        out_dim=out_dim,
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        patch_size=tuple(patch),
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
        image_dim=image_dim,
    )


def config_to_json(config: WanConfig, layout: str = "official") -> dict:
    """config.json contents in the style of the given layout (diffusers loads the diffusers one)."""
    if layout == "diffusers":
        return {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(config.patch_size),
            "num_attention_heads": config.num_heads,
            "attention_head_dim": config.head_dim,
            "in_channels": config.in_dim,
            "out_channels": config.out_dim,
            "text_dim": config.text_dim,
            "freq_dim": config.freq_dim,
            "ffn_dim": config.ffn_dim,
            "num_layers": config.num_layers,
            "cross_attn_norm": config.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
            "eps": config.eps,
            "image_dim": config.image_dim,
            "added_kv_proj_dim": config.dim if config.has_image_branch else None,
            "rope_max_seq_len": 1024,
            "pos_embed_seq_len": None,
        }
    if layout == "official":
        return {
            "_class_name": "WanModel",
            "model_type": config.model_type,
            "patch_size": list(config.patch_size),
            "text_len": config.text_len,
            "in_dim": config.in_dim,
            "dim": config.dim,
            "ffn_dim": config.ffn_dim,
            "freq_dim": config.freq_dim,
            "text_dim": config.text_dim,
            "out_dim": config.out_dim,
            "num_heads": config.num_heads,
            "num_layers": config.num_layers,
            "qk_norm": config.qk_norm,
            "cross_attn_norm": config.cross_attn_norm,
            "eps": config.eps,
            "image_dim": config.image_dim,
        }
    raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")


def matching_variants(config: WanConfig) -> list[str]:
    """Names of the known variants whose transformer is exactly ``config`` (several releases share one)."""
    return [name for name, spec in VARIANTS.items() if spec.transformer == config]


def detect_variant(config: WanConfig) -> str | None:
    """The first known variant with this transformer shape, or None.

    Shapes cannot tell Wan2.1-T2V-14B from a Wan2.2-T2V-A14B expert (or tiny-t2v from tiny-a14b);
    the model folder (two expert subfolders) decides that, see ``matching_variants``.
    """
    names = matching_variants(config)
    return names[0] if names else None


# --- loading ---------------------------------------------------------------------------------------


def _resolve_config(config: WanConfig | str | None, config_file: Path | None, shapes) -> WanConfig:
    if isinstance(config, str):
        return get_variant(config).transformer
    if config is not None:
        return config
    if config_file is not None:
        try:
            data = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_file}: invalid JSON ({err})") from None
        return config_from_json(data, shapes)
    return config_from_shapes(shapes)


def load_transformer(
    path: str | Path,
    *,
    config: WanConfig | str | None = None,
    variant: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shard: Callable[[nn.Module], object] | None = None,
) -> WanModel:
    """Load a Wan transformer from a safetensors file or folder (official or diffusers layout, detected).

    ``config`` (a ``WanConfig`` or variant name) or ``variant`` overrides the config.json / shape-based
    detection. Every tensor goes straight to ``device`` as ``dtype``. Raises ``CheckpointError`` naming
    missing, unexpected or mis-shaped keys, or an unreadable file.

    ``shard``: called on the model while it is still on ``meta`` (e.g. FSDP2 ``fully_shard`` over the
    ranks, ``wan_model.pipeline.fsdp.shard_transformer``). Each tensor is then read, and only this
    rank's part of it is kept on ``device``: no rank ever holds the whole model there, which is what
    lets a 14B model load on cards smaller than its weights.
    """
    files, config_file = checkpoint_files(path)
    entries = read_checkpoint_keys(files)
    shapes = {name: shape for name, (_, _, shape) in entries.items()}
    cfg = _resolve_config(config if config is not None else variant, config_file, shapes)

    with torch.device("meta"):
        model = WanModel(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    if missing or unexpected:
        parts = [f"missing {_describe(missing)}" if missing else "", f"unexpected {_describe(unexpected)}" if unexpected else ""]
        raise CheckpointError(f"{path} does not match a Wan transformer {cfg}: " + "; ".join(p for p in parts if p))
    wrong = [f"{n} {entries[n][2]} (model wants {expected[n]})" for n in sorted(expected) if entries[n][2] != expected[n]]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch for {_describe(wrong)}")

    device = torch.device(device)
    params: dict[str, nn.Parameter] = {}
    if shard is not None:
        model = model.to(dtype)
        shard(model)
        model.to_empty(device=device)  # allocates only this rank's shards
        params = dict(model.named_parameters())
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key, _) in entries.items():
        by_file.setdefault(file, []).append((name, key))
    # safetensors can read straight onto a CUDA device; other devices go through (mmapped) host memory.
    if device.type == "cuda":
        read_device = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    else:
        read_device = "cpu"
    for file, names in by_file.items():
        with _open(file, read_device) as handle:
            for name, key in names:
                try:
                    tensor = handle.get_tensor(key)
                except Exception as err:
                    raise CheckpointError(f"cannot read tensor {key} from {file}: {err}") from err
                tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
                if shard is not None:
                    _fill_shard(params[name], tensor, name)
                else:
                    _assign(model, name, tensor)
    # Lets LoRA unmerging re-read the exact original tensors instead of keeping copies.
    model.checkpoint_source = CheckpointSource({n: (f, k) for n, (f, k, _) in entries.items()}, dtype)
    return model.eval()


class CheckpointSource:
    """Where each parameter of a loaded model came from, to re-read single tensors exactly."""

    def __init__(self, entries: Mapping[str, tuple[Path, str]], dtype: torch.dtype):
        self.entries = dict(entries)
        self.dtype = dtype

    def read(self, name: str, device: torch.device) -> torch.Tensor:
        """Parameter ``name`` exactly as ``load_transformer`` produced it, on ``device``."""
        file, key = self.entries[name]
        with _open(file) as handle:
            tensor = handle.get_tensor(key)
        return tensor.to(device=device, dtype=self.dtype if tensor.is_floating_point() else None)


def local_part(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (the whole parameter), laid out as ``param``'s local shard when
    ``param`` is a DTensor (FSDP2), else ``full`` itself. Local slicing: no communication."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


@torch.no_grad()
def _fill_shard(param: torch.Tensor, full: torch.Tensor, name: str) -> None:
    local = param.to_local() if hasattr(param, "to_local") else param
    part = local_part(param, full)
    if part.shape != local.shape:
        raise CheckpointError(f"{name}: this rank's shard has shape {tuple(local.shape)}, the checkpoint's part "
                              f"{tuple(part.shape)}")
    local.copy_(part)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter ``name`` by ``tensor`` without copying it again."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


# --- saving ----------------------------------------------------------------------------------------


def save_transformer(
    model_or_state_dict: WanModel | Mapping[str, torch.Tensor],
    folder: str | Path,
    *,
    layout: str = "official",
    config: WanConfig | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``diffusion_pytorch_model.safetensors`` (or shards + ``.index.json``) and ``config.json``.

    ``layout`` picks official or diffusers names (the diffusers folder loads in
    ``diffusers.WanTransformer3DModel.from_pretrained``). A state dict must use official names and comes
    with ``config`` (a model brings its own). Returns the folder.
    """
    if isinstance(model_or_state_dict, WanModel):
        config = config or model_or_state_dict.config
        state_dict = dict(model_or_state_dict.state_dict())
    else:
        state_dict = dict(model_or_state_dict)
        if config is None:
            config = config_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()})
    config_json = config_to_json(config, layout)
    if layout == "diffusers":
        state_dict = official_to_diffusers(state_dict)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    shards = _split_shards(state_dict, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _split_shards(state_dict: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_bytes is None:
        return [state_dict]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards

