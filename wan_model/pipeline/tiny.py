"""Tiny random-weight model folders in the real release layouts, for tests and the CPU demo.

    root = build_tiny_model_dir(variant="tiny-t2v", layout="official")   # ~/.cache/wanserve/tiny-t2v-official
    files = detect_model_dir(root)                                        # loads like a real release

Every component is written the way the real release stores it, at toy width: the DiT through
``wan_model.loader.save_transformer``, a 2-layer UMT5 encoder (d_model = the variant's
``text_encoder_dim``), a narrow ``AutoencoderKLWan`` of the Wan2.1 or Wan2.2 structure (the real
z_dim and latent mean/std), a 3-layer CLIP vision tower for tiny-i2v (width = ``image_dim``,
224px / patch 14, so 257 tokens as the real one), and a SentencePiece unigram tokenizer trained
in-process on a few sentences. Same seed, same weights. A finished folder carries
``.tiny-complete`` (its recipe) and is reused; one with another recipe (seed, builder version) is
rebuilt; a non-empty folder without the marker is never touched. Building goes to a temporary
sibling that is renamed into place, so concurrent builders (several ranks) never see half-written
folders.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wan_model.config import VARIANTS, get_variant

from .clip import OFFICIAL_CLIP_FILE, save_official_clip
from .model_dir import OFFICIAL_CLIP_TOKENIZER_DIR, OFFICIAL_EXPERT_DIRS, OFFICIAL_TOKENIZER_DIR, DIFFUSERS_EXPERT_DIRS
from .text_encoder import OFFICIAL_T5_FILE, save_official_t5, umt5_config
from .vae import OFFICIAL_VAE_FILES, save_official_vae, vae_config

logger = logging.getLogger(__name__)

BUILDER_VERSION = 2
MARKER = ".tiny-complete"
TINY_VAE_BASE_DIM = 8
TINY_CLIP = dict(intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, image_size=224, patch_size=14)
TINY_T5 = dict(d_kv=8, d_ff=64, num_layers=2, num_heads=4)

_SENTENCES = [
    "a cat walks slowly across the green grass in the warm afternoon sun",
    "A red car drives down a rainy city street at night, neon lights reflecting on the wet road.",
    "two dogs play with a yellow ball on a sandy beach while waves roll in",
    "close-up of a flower blooming, time-lapse, soft light, 4k",
    "the quick brown fox jumps over the lazy dog",
    "an astronaut rides a horse on the moon, cinematic, dramatic lighting",
    "waves crash against the rocks under a stormy grey sky",
    "a chef slices vegetables in a busy restaurant kitchen",
    "aerial view of a mountain lake surrounded by pine forests in autumn",
    "a little girl blows out the candles on her birthday cake",
    "Ein Hund läuft durch den Park und jagt einen Ball.",
    "Un chat noir dort sur le rebord de la fenêtre.",
    "一只猫在草地上散步，阳光明媚。",
    "children laugh and run through a field of sunflowers",
    "low quality, blurry, distorted, static, overexposed, worst quality, jpeg artifacts",
    "a train crosses an old stone bridge over a river, steam rising into the cold air",
    "slow motion shot of coffee being poured into a white cup",
    "a robot dances in the rain on a crowded street",
    "fireworks explode over the harbor at midnight",
    "an old man reads a newspaper on a bench in the park",
]


def default_tiny_dir(variant: str, layout: str) -> Path:
    return Path(os.path.expanduser("~/.cache/wanserve")) / f"{variant}-{layout}"


def build_tiny_tokenizer(folder: str | Path) -> Path:
    """A T5-style SentencePiece unigram tokenizer (pad 0, eos 1, unk 2), loadable by ``AutoTokenizer``."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # One thread and a fixed corpus make training deterministic; hard_vocab_limit=False lets the
    # vocabulary be as small as this corpus supports.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 3), model_writer=model, vocab_size=256, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1,
        character_coverage=1.0, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    }, indent=2) + "\n")
    # Converting spiece.model once here writes tokenizer.json too, as the real tokenizer folders have.
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    return folder


def _tiny_t5(vocab_size: int, d_model: int):
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel(umt5_config(vocab_size=vocab_size, d_model=d_model, **TINY_T5)).eval()


def _tiny_clip(width: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=width, hidden_act="gelu", layer_norm_eps=1e-5, **TINY_CLIP)
    return CLIPVisionModel(config).eval()


def _with_projection(clip, seed: int):
    """The same vision tower as ``CLIPVisionModelWithProjection``, the class diffusers' Wan I2V release stores."""
    from transformers import CLIPVisionModelWithProjection

    full = CLIPVisionModelWithProjection(clip.config).eval()
    vision = getattr(clip, "vision_model", clip)
    full.vision_model.load_state_dict(vision.state_dict(), strict=True)
    _randomize(full.visual_projection, seed)
    return full


def _tiny_vae(kind: str):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**vae_config(kind, base_dim=TINY_VAE_BASE_DIM, decoder_base_dim=TINY_VAE_BASE_DIM)).eval()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from a seeded generator (independent of global RNG and init code).

    Norm scales near 1, everything else ~ N(0, 1/fan_in): activations stay O(1) through the layers.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if "norm" in owner.lower() and (name.endswith(".weight") or name.endswith(".gamma")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)


def _write_components(root: Path, variant: str, layout: str, seed: int) -> None:
    from wan_model.loader import save_transformer
    from wan_model.model import WanModel

    spec = get_variant(variant)
    diffusers = layout == "diffusers"
    tokenizer_dir = build_tiny_tokenizer(root / ("tokenizer" if diffusers else OFFICIAL_TOKENIZER_DIR))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))

    # Transformer(s): official names, the loader writes the chosen layout.
    expert_dirs = DIFFUSERS_EXPERT_DIRS if diffusers else OFFICIAL_EXPERT_DIRS
    for i, expert in enumerate(spec.experts):
        model = WanModel(spec.transformer)
        _randomize(model, seed * 1000 + 10 + i)
        folder = root / (expert_dirs[expert] if expert else ("transformer" if diffusers else ""))
        save_transformer(model, folder, layout=layout)

    # Text encoder, stored in bf16 as the release is.
    t5 = _tiny_t5(vocab, spec.text_encoder_dim)
    _randomize(t5, seed * 1000 + 1)
    t5 = t5.to(torch.bfloat16)
    if diffusers:
        t5.save_pretrained(root / "text_encoder")
    else:
        save_official_t5(t5, root / OFFICIAL_T5_FILE)

    vae = _tiny_vae(spec.vae)
    _randomize(vae, seed * 1000 + 2)
    if diffusers:
        vae.save_pretrained(root / "vae")
    else:
        save_official_vae(vae, root / OFFICIAL_VAE_FILES[spec.vae], spec.vae)

    if spec.uses_clip:
        clip = _tiny_clip(spec.transformer.image_dim)
        _randomize(clip, seed * 1000 + 3)
        if diffusers:
            from .clip import CLIP_MEAN, CLIP_STD

            _with_projection(clip, seed * 1000 + 4).save_pretrained(root / "image_encoder")
            # Written by hand: CLIPImageProcessor itself wants torchvision, which this project does not need.
            (root / "image_processor").mkdir()
            (root / "image_processor" / "preprocessor_config.json").write_text(json.dumps({
                "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD), "do_convert_rgb": True,
            }, indent=2) + "\n")
        else:
            save_official_clip(clip, root / OFFICIAL_CLIP_FILE)
            # The release ships the XLM-R text tokenizer here; only the image tower is used, so a
            # stand-in tokenizer marks the folder.
            build_tiny_tokenizer(root / OFFICIAL_CLIP_TOKENIZER_DIR)

    if diffusers:
        _write_diffusers_index(root, spec)


def _write_diffusers_index(root: Path, spec) -> None:
    import diffusers

    none = [None, None]
    index = {
        "_class_name": "WanImageToVideoPipeline" if spec.task == "i2v" else "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if spec.is_moe else none,
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "boundary_ratio": spec.boundary,
        "expand_timesteps": spec.task == "ti2v",
    }
    if spec.task == "i2v":  # only the image-to-video pipeline has these components (None without CLIP)
        index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"] if spec.uses_clip else none
        index["image_processor"] = ["transformers", "CLIPImageProcessor"] if spec.uses_clip else none
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True,
        "num_train_timesteps": 1000, "flow_shift": spec.shift,
    }, indent=2) + "\n")


def _recipe(variant: str, layout: str, seed: int) -> dict:
    return {"variant": variant, "layout": layout, "seed": seed, "builder_version": BUILDER_VERSION}


def build_tiny_model_dir(path: str | Path | None = None, variant: str = "tiny-t2v", layout: str = "official",
                         seed: int = 0) -> Path:
    """Write (or reuse) a tiny model folder; returns its path. See the module doc.

    ``variant``: one of tiny-t2v, tiny-i2v, tiny-a14b, tiny-ti2v ("t2v" etc. accepted too).
    ``path`` None: ``~/.cache/wanserve/<variant>-<layout>``.
    """
    if variant not in VARIANTS and f"tiny-{variant}" in VARIANTS:
        variant = f"tiny-{variant}"
    spec = get_variant(variant)
    if not spec.tiny:
        raise ValueError(f"{variant} is not a tiny variant")
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    root = Path(path).expanduser() if path is not None else default_tiny_dir(variant, layout)
    recipe = _recipe(variant, layout, seed)
    found = _read_marker(root)
    if found == recipe:
        return root
    replacing = found is not None  # a tiny folder of ours with another recipe (seed, builder version)
    if not replacing and root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists, is not empty and is not a finished tiny model folder")
    if replacing:
        logger.warning("rebuilding tiny model folder %s: it holds %s, %s was asked for", root, found, recipe)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    old = None
    try:
        _write_components(tmp, variant, layout, seed)
        (tmp / MARKER).write_text(json.dumps(recipe) + "\n")
        if replacing:
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.rename(root, old / "dir")
        elif root.exists():
            root.rmdir()  # empty (checked above); a concurrent builder may have finished meanwhile
        os.rename(tmp, root)
    except OSError:
        if _read_marker(root) == recipe:
            return root  # another process built it first
        raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return root


def _read_marker(root: Path) -> dict | None:
    """The recipe a finished tiny folder was built from, or None when ``root`` is not one."""
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
