"""Model configurations: the transformer's shape, and each named variant's pipeline defaults."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class WanConfig:
    """Shape of one Wan diffusion transformer (names follow official ``wan/modules/model.py``)."""

    model_type: str = "t2v"  # "t2v", "i2v" (Wan2.1 I2V: CLIP image branch) or "ti2v"
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: int | None = None  # CLIP feature width (1280) when the model has the image branch

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_branch(self) -> bool:
        return self.image_dim is not None


@dataclass(frozen=True)
class VariantSpec:
    """A named release: its transformer(s), VAE, and sampling defaults."""

    name: str
    transformer: WanConfig
    task: str  # "t2v", "i2v" or "ti2v"
    # Two experts for Wan2.2 A14B (high-noise first, used while t >= boundary); one otherwise.
    experts: tuple[str, ...] = ("",)
    boundary: float | None = None  # as a fraction of the 1000 training timesteps
    vae: str = "wan2.1"  # "wan2.1": z 16, stride 4x8x8; "wan2.2": z 48, stride 4x16x16
    fps: int = 16
    steps: int = 50
    shift: float = 5.0
    # One number, or (low-noise, high-noise) for the two A14B experts, as in the official configs.
    guidance: float | tuple[float, float] = 5.0
    sampler: str = "unipc"
    uses_clip: bool = False
    default_size: tuple[int, int] = (832, 480)  # (width, height)
    default_frames: int = 81
    text_encoder_dim: int = 4096
    # Put before the default negative prompt (official Wan2.1 I2V-14B adds "camera shake").
    negative_prompt_prefix: str = ""
    tiny: bool = False

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        return (4, 16, 16) if self.vae == "wan2.2" else (4, 8, 8)

    @property
    def z_dim(self) -> int:
        return 48 if self.vae == "wan2.2" else 16

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE stride x patch)."""
        return self.vae_stride[1] * self.transformer.patch_size[1]

    @property
    def is_moe(self) -> bool:
        return len(self.experts) > 1


_WAN21_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_WAN21_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_WAN22_5B = WanConfig(model_type="ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
# Tiny: the same code at toy width. 4 heads so that Ulysses 2 and 4 both divide them.
_TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)

VARIANTS: dict[str, VariantSpec] = {
    v.name: v
    for v in [
        VariantSpec("wan2.1-t2v-1.3b", _WAN21_1_3B, "t2v", shift=5.0, guidance=5.0),
        VariantSpec("wan2.1-t2v-14b", _WAN21_14B, "t2v", default_size=(1280, 720)),
        VariantSpec(
            "wan2.1-i2v-14b",
            replace(_WAN21_14B, model_type="i2v", in_dim=36, image_dim=1280),
            "i2v", steps=40, shift=5.0, guidance=5.0, uses_clip=True, default_size=(1280, 720),
            negative_prompt_prefix="镜头晃动，",  # official wan/configs/wan_i2v_14B.py
        ),
        VariantSpec(
            "wan2.2-t2v-a14b", _WAN21_14B, "t2v", experts=("high_noise", "low_noise"), boundary=0.875,
            steps=40, shift=12.0, guidance=(3.0, 4.0), default_size=(1280, 720),
        ),
        VariantSpec(
            "wan2.2-i2v-a14b", replace(_WAN21_14B, model_type="i2v", in_dim=36), "i2v",
            experts=("high_noise", "low_noise"), boundary=0.9, steps=40, shift=5.0, guidance=(3.5, 3.5),
            default_size=(1280, 720),
        ),
        VariantSpec(
            "wan2.2-ti2v-5b", _WAN22_5B, "ti2v", vae="wan2.2", fps=24, steps=50, shift=5.0, guidance=5.0,
            default_size=(1280, 704), default_frames=121, text_encoder_dim=4096,
        ),
        # Tiny variants: random weights, used by tests and the CPU demo. They make noise videos.
        VariantSpec("tiny-t2v", _TINY, "t2v", steps=4, default_size=(64, 64), default_frames=5,
                    text_encoder_dim=32, tiny=True),
        VariantSpec("tiny-i2v", replace(_TINY, model_type="i2v", in_dim=36, image_dim=32), "i2v", steps=4,
                    uses_clip=True, default_size=(64, 64), default_frames=5, text_encoder_dim=32,
                    negative_prompt_prefix="镜头晃动，", tiny=True),
        VariantSpec("tiny-a14b", _TINY, "t2v", experts=("high_noise", "low_noise"), boundary=0.875, steps=4,
                    shift=12.0, guidance=(3.0, 4.0), default_size=(64, 64), default_frames=5,
                    text_encoder_dim=32, tiny=True),
        VariantSpec("tiny-ti2v", replace(_TINY, model_type="ti2v", in_dim=48, out_dim=48), "ti2v", vae="wan2.2",
                    fps=24, steps=4, default_size=(64, 64), default_frames=5, text_encoder_dim=32, tiny=True),
    ]
}


def get_variant(name: str) -> VariantSpec:
    """The variant called ``name``; an unknown name lists the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model variant {name!r}; known variants: {', '.join(sorted(VARIANTS))}") from None
