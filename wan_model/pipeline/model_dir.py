"""Recognise a Wan model folder (official release or diffusers layout) and list its component files.

    files = detect_model_dir("/models/Wan2.2-T2V-A14B")
    files.variant                   # "wan2.2-t2v-a14b"
    files.transformer               # {"high_noise": Path(.../high_noise_model), "low_noise": Path(...)}
    TextEncoder.load(files.text_encoder, files.tokenizer); WanVAE.load(files.vae, kind=files.vae_kind)
    CLIPImageEncoder.load(files.clip)   # only when files.clip is not None (Wan2.1 I2V)

Official layout (Wan-AI release repos):
    config.json + diffusion_pytorch_model*.safetensors [+ .index.json]  (or high_noise_model/ and
    low_noise_model/, each with its own, for the two A14B experts), models_t5_umt5-xxl-enc-bf16.pth,
    google/umt5-xxl/ (tokenizer), Wan2.1_VAE.pth or Wan2.2_VAE.pth, and for Wan2.1 I2V
    models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth + xlm-roberta-large/.
Diffusers layout: model_index.json, transformer/ [transformer_2/ = the low-noise expert],
    text_encoder/, tokenizer/, vae/, scheduler/, and for Wan2.1 I2V image_encoder/ + image_processor/.

Each transformer path is the folder holding that expert's weights and config.json (what
``wan_model.loader.load_transformer`` takes). A missing file raises ``FileNotFoundError`` naming it.
The variant comes from the transformer's config.json (``wan_model.loader.config_from_json``), the
number of experts and the VAE kind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from wan_model.config import VARIANTS, VariantSpec, get_variant

from .clip import OFFICIAL_CLIP_FILE
from .text_encoder import OFFICIAL_T5_FILE
from .vae import OFFICIAL_VAE_FILES

OFFICIAL_TOKENIZER_DIR = "google/umt5-xxl"
OFFICIAL_CLIP_TOKENIZER_DIR = "xlm-roberta-large"
OFFICIAL_EXPERT_DIRS = {"high_noise": "high_noise_model", "low_noise": "low_noise_model"}
DIFFUSERS_EXPERT_DIRS = {"high_noise": "transformer", "low_noise": "transformer_2"}
WEIGHTS_PREFIX = "diffusion_pytorch_model"


@dataclass(frozen=True)
class ModelFiles:
    """Where each component of one model lives. See the module doc."""

    root: Path
    layout: str  # "official" or "diffusers"
    variant: str
    transformer: dict[str, Path]  # {"": folder} or {"high_noise": folder, "low_noise": folder}
    text_encoder: Path  # official .pth file, or HF folder
    tokenizer: Path  # folder for AutoTokenizer
    vae: Path  # official .pth file, or diffusers folder
    vae_kind: str  # "wan2.1" or "wan2.2"
    clip: Path | None = None  # official .pth file, or HF CLIPVisionModel folder (Wan2.1 I2V only)
    clip_processor: Path | None = None  # xlm-roberta-large/ (official) or image_processor/ (diffusers), if present
    extra: dict = field(default_factory=dict)  # e.g. {"scheduler": Path} for diffusers folders

    @property
    def spec(self) -> VariantSpec:
        return get_variant(self.variant)


def _require(path: Path, what: str, *, folder: bool = False) -> Path:
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise FileNotFoundError(f"{what}: missing {kind} {path}")
    return path


def _check_weights(folder: Path, what: str) -> None:
    """The folder must hold transformer weights: one safetensors file, or an index and all its shards."""
    _require(folder, what, folder=True)
    index = folder / f"{WEIGHTS_PREFIX}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err})") from None
        for shard in shards:
            _require(folder / shard, f"{what} (listed in {index.name})")
        return
    if not list(folder.glob(f"{WEIGHTS_PREFIX}*.safetensors")):
        raise FileNotFoundError(f"{what}: missing file {folder / (WEIGHTS_PREFIX + '.safetensors')} "
                                f"(or sharded {WEIGHTS_PREFIX}-*.safetensors with an index)")


def _transformer_config(folder: Path):
    """WanConfig of the transformer in ``folder`` (config.json, with tensor shapes for the image branch)."""
    from wan_model.loader import checkpoint_files, config_from_json, config_from_shapes, read_checkpoint_keys

    files, config_file = checkpoint_files(folder)
    shapes = {name: entry[2] for name, entry in read_checkpoint_keys(files).items()}
    if config_file is None:
        return config_from_shapes(shapes)
    return config_from_json(json.loads(config_file.read_text()), shapes)


def _pick_variant(root: Path, transformer: dict[str, Path], vae_kind: str, requested: str | None) -> str:
    from wan_model.loader import matching_variants

    config = _transformer_config(next(iter(transformer.values())))
    num_experts = len(transformer)
    names = [n for n in matching_variants(config)
             if len(VARIANTS[n].experts) == num_experts and VARIANTS[n].vae == vae_kind]
    if requested is not None:
        spec = get_variant(requested)
        if requested not in names:
            raise ValueError(f"{root} does not hold {requested}: its transformer ({num_experts} expert(s), "
                             f"{vae_kind} VAE) matches {names or 'no known variant'}")
        return spec.name
    if not names:
        raise ValueError(f"{root}: transformer {config} with {num_experts} expert(s) and a {vae_kind} VAE "
                         f"matches no known variant")
    return names[0]


def _detect_official(root: Path, variant: str | None) -> ModelFiles:
    expert_dirs = {name: root / sub for name, sub in OFFICIAL_EXPERT_DIRS.items()}
    if any(p.exists() for p in expert_dirs.values()):
        for name, folder in expert_dirs.items():
            _check_weights(folder, f"{name} expert of {root}")
        transformer = expert_dirs
    else:
        _check_weights(root, f"transformer of {root}")
        transformer = {"": root}
    text_encoder = _require(root / OFFICIAL_T5_FILE, "text encoder")
    tokenizer = _require(root / OFFICIAL_TOKENIZER_DIR, "tokenizer", folder=True)
    present = [kind for kind, name in OFFICIAL_VAE_FILES.items() if (root / name).is_file()]
    if not present:
        raise FileNotFoundError(f"VAE: missing file {root / OFFICIAL_VAE_FILES['wan2.1']} "
                                f"(or {OFFICIAL_VAE_FILES['wan2.2']})")
    if len(present) > 1:
        # Prefer the VAE the requested variant uses; otherwise the folder is ambiguous.
        if variant is None:
            raise ValueError(f"{root} holds both {OFFICIAL_VAE_FILES['wan2.1']} and {OFFICIAL_VAE_FILES['wan2.2']}; "
                             f"name the variant")
        present = [get_variant(variant).vae]
    vae_kind = present[0]
    name = _pick_variant(root, transformer, vae_kind, variant)
    clip = clip_processor = None
    if VARIANTS[name].uses_clip:
        clip = _require(root / OFFICIAL_CLIP_FILE, "CLIP image encoder")
        processor = root / OFFICIAL_CLIP_TOKENIZER_DIR
        clip_processor = processor if processor.is_dir() else None
    return ModelFiles(root=root, layout="official", variant=name, transformer=transformer, text_encoder=text_encoder,
                      tokenizer=tokenizer, vae=root / OFFICIAL_VAE_FILES[vae_kind], vae_kind=vae_kind, clip=clip,
                      clip_processor=clip_processor)


def _index_has(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def _detect_diffusers(root: Path, variant: str | None) -> ModelFiles:
    index_file = root / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_file}: invalid JSON ({err})") from None
    if _index_has(index, "transformer_2") or (root / "transformer_2").is_dir():
        transformer = {name: root / sub for name, sub in DIFFUSERS_EXPERT_DIRS.items()}
    else:
        transformer = {"": root / "transformer"}
    for name, folder in transformer.items():
        _check_weights(folder, f"transformer{' (' + name + ' expert)' if name else ''} of {root}")
        _require(folder / "config.json", "transformer config")
    text_encoder = _require(root / "text_encoder", "text encoder", folder=True)
    _require(text_encoder / "config.json", "text encoder config")
    tokenizer = _require(root / "tokenizer", "tokenizer", folder=True)
    vae = _require(root / "vae", "VAE", folder=True)
    vae_config = json.loads(_require(vae / "config.json", "VAE config").read_text())
    vae_kind = "wan2.2" if int(vae_config.get("z_dim", 16)) == 48 else "wan2.1"
    name = _pick_variant(root, transformer, vae_kind, variant)
    clip = clip_processor = None
    if VARIANTS[name].uses_clip:
        clip = _require(root / "image_encoder", "CLIP image encoder", folder=True)
        _require(clip / "config.json", "CLIP image encoder config")
        processor = root / "image_processor"
        clip_processor = processor if processor.is_dir() else None
    extra = {"scheduler": root / "scheduler"} if (root / "scheduler").is_dir() else {}
    return ModelFiles(root=root, layout="diffusers", variant=name, transformer=transformer, text_encoder=text_encoder,
                      tokenizer=tokenizer, vae=vae, vae_kind=vae_kind, clip=clip, clip_processor=clip_processor,
                      extra=extra)


def detect_layout(root: str | Path) -> str:
    """"diffusers" (model_index.json) or "official"; raises when the folder is neither."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    if (root / "model_index.json").is_file():
        return "diffusers"
    markers = [OFFICIAL_T5_FILE, "config.json", *OFFICIAL_EXPERT_DIRS.values(), *OFFICIAL_VAE_FILES.values()]
    if any((root / m).exists() for m in markers) or list(root.glob(f"{WEIGHTS_PREFIX}*.safetensors")):
        return "official"
    raise FileNotFoundError(f"{root} is not a Wan model folder: no model_index.json (diffusers layout) and none of "
                            f"{', '.join(markers)} (official layout)")


def detect_model_dir(root: str | Path, *, variant: str | None = None) -> ModelFiles:
    """List the components of the model folder ``root``; ``variant`` (optional) must then match it."""
    root = Path(root).expanduser()
    if detect_layout(root) == "diffusers":
        return _detect_diffusers(root, variant)
    return _detect_official(root, variant)
