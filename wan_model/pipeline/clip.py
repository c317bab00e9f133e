"""CLIP ViT-H/14 image encoder for Wan2.1 I2V: image -> penultimate-block features [B, 257, 1280].

    clip = CLIPImageEncoder.load(path, device="cuda:0")        # dtype: fp16 on CUDA, fp32 on CPU
    features = clip.encode(images)     # images [B, 3, H, W] in [-1, 1] -> [B, 257, dim]

``path`` is the official ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (only its
``visual.*`` tower is used; keys renamed here) or a Hugging Face ``CLIPVisionModel`` folder (the
diffusers release's ``image_encoder/``).

Preprocessing and output follow the official ``CLIPModel.visual``: bicubic resize to 224x224 (no
crop), [-1, 1] -> [0, 1], normalize with the CLIP mean/std, then the hidden states after 31 of the
32 transformer blocks (``use_31_block``; ``hidden_states[-2]`` in HF terms), without the final norm.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .pth import load_pth

OFFICIAL_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Head counts cannot be read from shapes: ViT-H/14 has 16; the tiny test tower (width 32) has 2.
_HEADS_BY_WIDTH = {1280: 16, 32: 2}

_LAYER_RENAMES = {  # official visual.transformer.N.* -> HF encoder.layers.N.* (to_qkv is split separately)
    "norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight", "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias",
}
_LAYER_RENAMES_INV = {v: k for k, v in _LAYER_RENAMES.items()}


def official_clip_to_hf(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``visual.*`` tower of the official XLM-R CLIP checkpoint in ``CLIPVisionModel`` names.

    ``prefix`` is the model's own key prefix ("" in transformers 5, "vision_model." before).
    The text tower, ``log_scale`` and the visual projection ``visual.head`` are not needed and dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("visual.") or key == "visual.head":
            continue
        name = key[len("visual."):]
        if name == "patch_embedding.weight":
            out[prefix + "embeddings.patch_embedding.weight"] = value
        elif name == "cls_embedding":
            out[prefix + "embeddings.class_embedding"] = value.reshape(-1)
        elif name == "pos_embedding":
            out[prefix + "embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif name.startswith("pre_norm."):
            out[prefix + "pre_layrnorm." + name.split(".", 1)[1]] = value
        elif name.startswith("post_norm."):
            out[prefix + "post_layernorm." + name.split(".", 1)[1]] = value
        elif name.startswith("transformer."):
            _, index, rest = name.split(".", 2)
            base = f"{prefix}encoder.layers.{index}."
            if rest in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = value.chunk(3, dim=0)  # official view(b, s, 3, heads, d): q, k, v stacked in that order
                out[base + f"self_attn.q_proj.{kind}"] = q
                out[base + f"self_attn.k_proj.{kind}"] = k
                out[base + f"self_attn.v_proj.{kind}"] = v
            elif rest in _LAYER_RENAMES:
                out[base + _LAYER_RENAMES[rest]] = value
            else:
                raise KeyError(f"unexpected key {key!r} in the official CLIP checkpoint")
        else:
            raise KeyError(f"unexpected key {key!r} in the official CLIP checkpoint")
    return out


def hf_clip_to_official(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_clip_to_hf` for the vision tower (used to write official-layout files)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            raise KeyError(f"unexpected key {key!r} in a CLIPVisionModel state dict")
        name = key[len(prefix):]
        if name == "embeddings.position_ids":
            continue
        if name == "embeddings.patch_embedding.weight":
            out["visual.patch_embedding.weight"] = value
        elif name == "embeddings.class_embedding":
            out["visual.cls_embedding"] = value.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = value.unsqueeze(0)
        elif name.startswith("pre_layrnorm."):
            out["visual.pre_norm." + name.split(".", 1)[1]] = value
        elif name.startswith("post_layernorm."):
            out["visual.post_norm." + name.split(".", 1)[1]] = value
        elif name.startswith("encoder.layers."):
            _, _, index, rest = name.split(".", 3)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                proj, kind = rest.split(".")[1:]
                qkv.setdefault((index, kind), {})[proj] = value
            else:
                out[f"visual.transformer.{index}.{_LAYER_RENAMES_INV[rest]}"] = value
        else:
            raise KeyError(f"unexpected key {key!r} in a CLIPVisionModel state dict")
    for (index, kind), parts in qkv.items():
        out[f"visual.transformer.{index}.attn.to_qkv.{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def clip_config_from_official(state_dict: dict[str, torch.Tensor]):
    """The ``CLIPVisionConfig`` of the official checkpoint's visual tower (sizes from shapes)."""
    from transformers import CLIPVisionConfig

    width, _, patch, _ = state_dict["visual.patch_embedding.weight"].shape
    num_positions = state_dict["visual.pos_embedding"].shape[-2]
    grid = int(round((num_positions - 1) ** 0.5))
    layers = len({k.split(".")[2] for k in state_dict if k.startswith("visual.transformer.")})
    if width not in _HEADS_BY_WIDTH:
        raise ValueError(f"official CLIP visual tower of width {width}: unknown head count "
                         f"(known widths: {sorted(_HEADS_BY_WIDTH)})")
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=state_dict["visual.transformer.0.mlp.0.weight"].shape[0],
        num_attention_heads=_HEADS_BY_WIDTH[width], num_hidden_layers=layers, image_size=grid * patch,
        patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024,
    )


def _key_prefix(model: nn.Module) -> str:
    return "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""


def _embeddings(model: nn.Module) -> nn.Module:
    # transformers 5 dropped the ``vision_model`` wrapper; find the module by its class
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    return next(m for m in model.modules() if isinstance(m, CLIPVisionEmbeddings))


def load_clip_vision(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``CLIPVisionModel`` (or ``...WithProjection``) on CPU, eval mode, from the official .pth or an HF folder."""
    from transformers import CLIPVisionModel

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CLIP image encoder checkpoint not found: {path}")
    if path.is_dir():
        import json

        from transformers import CLIPVisionModelWithProjection

        # diffusers' Wan I2V release stores CLIPVisionModelWithProjection; its projection is unused
        # but loading the stored class keeps the load free of "unexpected key" reports.
        config_file = path / "config.json"
        architectures = json.loads(config_file.read_text()).get("architectures") or [] if config_file.is_file() else []
        cls = CLIPVisionModelWithProjection if "CLIPVisionModelWithProjection" in architectures else CLIPVisionModel
        model = cls.from_pretrained(path, dtype=dtype)
    else:
        state = load_pth(path)
        if "visual.patch_embedding.weight" not in state:
            raise ValueError(f"{path} is not an official Wan CLIP checkpoint (no visual.patch_embedding.weight)")
        with torch.device("meta"):  # no random init of the 632M-parameter tower in float32
            model = CLIPVisionModel(clip_config_from_official(state))
        hf_state = {k: v.to(dtype) for k, v in official_clip_to_hf(state, _key_prefix(model)).items()}
        missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{path}: CLIP visual tower keys do not match: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        # A buffer transformers builds rather than stores: make it again, off meta.
        embeddings = _embeddings(model)
        embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
        still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if still_meta:
            raise RuntimeError(f"{path}: CLIP tensors not loaded: {still_meta[:5]}")
    return model.to(dtype).eval().requires_grad_(False)


def save_official_clip(model: nn.Module, path: str | Path) -> None:
    """Write a ``CLIPVisionModel`` as an official-layout ``.pth`` (visual tower + ``log_scale``)."""
    state = {k: v.detach().clone().contiguous()
             for k, v in hf_clip_to_official(model.state_dict(), _key_prefix(model)).items()}
    state["log_scale"] = torch.tensor(4.6052)
    torch.save(state, path)


class CLIPImageEncoder:
    """Wan2.1 I2V image features; see the module doc."""

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.dtype = next(model.parameters()).dtype
        self.image_size = model.config.image_size
        self.dim = model.config.hidden_size

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> "CLIPImageEncoder":
        """``dtype`` None: float16 on CUDA (official ``clip_dtype``), float32 elsewhere."""
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        return cls(load_clip_vision(path, dtype=dtype), device=device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 3, 224, 224] normalized, float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W]; got {tuple(images.shape)}")
        size = (self.image_size, self.image_size)
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x * 0.5 + 0.5 - mean) / std

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 1 + (224/14)^2, dim] penultimate-block hidden states (model dtype)."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2]
