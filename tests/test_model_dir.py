"""Model-folder detection (official and diffusers layouts) and the tiny model-folder builder."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan_model.pipeline.model_dir import detect_layout, detect_model_dir
from wan_model.pipeline.tiny import build_tiny_model_dir

VARIANTS = ["tiny-t2v", "tiny-a14b", "tiny-i2v", "tiny-ti2v"]
LAYOUTS = ["official", "diffusers"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirs")
    return {(v, lay): build_tiny_model_dir(root / f"{v}-{lay}", v, lay) for v in VARIANTS for lay in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_both_layouts_are_recognised(built, variant, layout):
    from transformers import AutoTokenizer

    root = built[variant, layout]
    files = detect_model_dir(root)
    assert files.layout == layout == detect_layout(root)
    assert files.variant == variant
    experts = {"tiny-a14b": {"high_noise", "low_noise"}}.get(variant, {""})
    assert set(files.transformer) == experts
    for folder in files.transformer.values():
        assert folder.is_dir() and (folder / "config.json").is_file()
        assert list(folder.glob("diffusion_pytorch_model*.safetensors"))
    if layout == "official":
        assert files.text_encoder == root / "models_t5_umt5-xxl-enc-bf16.pth"
        assert files.tokenizer == root / "google" / "umt5-xxl"
        assert files.vae.name == ("Wan2.2_VAE.pth" if variant == "tiny-ti2v" else "Wan2.1_VAE.pth")
        if variant == "tiny-a14b":
            assert files.transformer["high_noise"] == root / "high_noise_model"
    else:
        assert files.text_encoder == root / "text_encoder" and files.tokenizer == root / "tokenizer"
        assert files.vae == root / "vae"
        if variant == "tiny-a14b":
            assert files.transformer == {"high_noise": root / "transformer", "low_noise": root / "transformer_2"}
    assert files.vae_kind == ("wan2.2" if variant == "tiny-ti2v" else "wan2.1")
    assert (files.clip is not None) == (variant == "tiny-i2v")
    if files.clip is not None:
        assert files.clip_processor is not None and files.clip_processor.is_dir()
    assert len(AutoTokenizer.from_pretrained(files.tokenizer)) > 20


def test_transformers_load_through_the_loader(built):
    from wan_model.loader import load_transformer

    for (variant, layout), root in built.items():
        files = detect_model_dir(root)
        for folder in files.transformer.values():
            model = load_transformer(folder)
            assert model.config == files.spec.transformer


def _copy(built, variant, layout, tmp_path) -> Path:
    dst = tmp_path / f"{variant}-{layout}"
    shutil.copytree(built[variant, layout], dst)
    return dst


@pytest.mark.parametrize("variant,layout,remove,named", [
    ("tiny-t2v", "official", "models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-bf16.pth"),
    ("tiny-t2v", "official", "google/umt5-xxl", "umt5-xxl"),
    ("tiny-t2v", "official", "Wan2.1_VAE.pth", "Wan2.1_VAE.pth"),
    ("tiny-t2v", "official", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors"),
    ("tiny-a14b", "official", "low_noise_model/diffusion_pytorch_model.safetensors", "low_noise_model"),
    ("tiny-a14b", "official", "low_noise_model", "low_noise_model"),
    ("tiny-i2v", "official", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "models_clip_open-clip"),
    ("tiny-t2v", "diffusers", "vae", "vae"),
    ("tiny-t2v", "diffusers", "text_encoder", "text_encoder"),
    ("tiny-t2v", "diffusers", "tokenizer", "tokenizer"),
    ("tiny-a14b", "diffusers", "transformer_2/diffusion_pytorch_model.safetensors", "transformer_2"),
    ("tiny-i2v", "diffusers", "image_encoder", "image_encoder"),
])
def test_missing_file_is_named(built, tmp_path, variant, layout, remove, named):
    root = _copy(built, variant, layout, tmp_path)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=named):
        detect_model_dir(root)


def test_sharded_official_checkpoint_and_missing_shard(built, tmp_path):
    from wan_model.loader import load_transformer, save_transformer

    root = _copy(built, "tiny-t2v", "official", tmp_path)
    model = load_transformer(root)
    (root / "diffusion_pytorch_model.safetensors").unlink()
    save_transformer(model, root, layout="official", max_shard_bytes=200_000)
    shards = sorted(root.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    assert detect_model_dir(root).variant == "tiny-t2v"
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        detect_model_dir(root)


def test_not_a_model_folder_and_wrong_variant(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Wan model folder"):
        detect_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        detect_model_dir(tmp_path / "absent")
    # Same transformer shape as tiny-a14b's experts, but one expert: not tiny-a14b.
    with pytest.raises(ValueError, match="does not hold tiny-a14b"):
        detect_model_dir(built["tiny-t2v", "official"], variant="tiny-a14b")
    assert detect_model_dir(built["tiny-t2v", "diffusers"], variant="tiny-t2v").variant == "tiny-t2v"


def test_a_transformer_of_another_wan_class_is_refused_when_the_folder_is_read(built, tmp_path):
    root = tmp_path / "vace"
    shutil.copytree(built["tiny-t2v", "diffusers"], root)
    config_file = root / "transformer" / "config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()),
                                           _class_name="WanVACETransformer3DModel")))
    with pytest.raises(ValueError, match="unsupported transformer WanVACETransformer3DModel"):
        detect_model_dir(root)


# ---- tiny builder -------------------------------------------------------------------------------


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            out.update({f"{rel}:{k}": v for k, v in load_file(path).items()})
        elif path.suffix == ".pth":
            out.update({f"{rel}:{k}": v for k, v in torch.load(path, weights_only=True).items()})
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_builder_is_deterministic_and_fast(tmp_path, layout):
    build_tiny_model_dir(tmp_path / "warm", "tiny-t2v", layout)  # imports out of the timing
    timings = []
    roots = []
    for name in ("a", "b"):
        start = time.perf_counter()
        roots.append(build_tiny_model_dir(tmp_path / name, "tiny-i2v", layout, seed=7))
        timings.append(time.perf_counter() - start)
    assert max(timings) < 10.0, timings  # typically ~0.1 s; generous for a loaded CI machine
    a, b = _tensors(roots[0]), _tensors(roots[1])
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    tok = "google/umt5-xxl" if layout == "official" else "tokenizer"
    for name in ("spiece.model", "tokenizer.json"):
        assert (roots[0] / tok / name).read_bytes() == (roots[1] / tok / name).read_bytes()
    other = _tensors(build_tiny_model_dir(tmp_path / "c", "tiny-i2v", layout, seed=8))
    assert other.keys() == a.keys()
    assert sum(not torch.equal(a[k], other[k]) for k in a) > len(a) // 2


def test_tiny_builder_reuses_a_complete_folder_and_refuses_others(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    root = build_tiny_model_dir(variant="t2v")
    assert root == tmp_path / ".cache" / "wanserve" / "tiny-t2v-official"
    stamp = (root / "Wan2.1_VAE.pth").stat().st_mtime_ns
    assert build_tiny_model_dir(variant="tiny-t2v") == root
    assert (root / "Wan2.1_VAE.pth").stat().st_mtime_ns == stamp
    assert json.loads((root / ".tiny-complete").read_text())["seed"] == 0
    # Another recipe at the same place: rebuilt in place (it is our own cache), no leftovers.
    before = load_file(root / "diffusion_pytorch_model.safetensors")
    assert build_tiny_model_dir(root, "tiny-t2v", seed=1) == root
    assert json.loads((root / ".tiny-complete").read_text())["seed"] == 1
    after = load_file(root / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(before["patch_embedding.weight"], after["patch_embedding.weight"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_model_dir(tmp_path / "junk")
    with pytest.raises(ValueError, match="not a tiny variant"):
        build_tiny_model_dir(tmp_path / "x", "wan2.1-t2v-1.3b")
    with pytest.raises(ValueError, match="layout"):
        build_tiny_model_dir(tmp_path / "x", "tiny-t2v", layout="comfy")
    assert not list(tmp_path.glob(".*building*"))
    assert sorted(p.name for p in (tmp_path / ".cache" / "wanserve").iterdir()) == ["tiny-t2v-official"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_service_tells_the_variant_of_a_hugging_face_cache_snapshot(built, tmp_path, layout):
    """A snapshot folder's name is a commit hash: the variant comes from the files, as the workers
    would find it, not from the name."""
    from service.config import ServiceSettings

    snapshot = tmp_path / "models--Wan-AI--Wan2.2-T2V-A14B" / "snapshots" / "0123abcd"
    shutil.copytree(built["tiny-a14b", layout], snapshot)
    (snapshot / "wanserve.json").unlink(missing_ok=True)
    assert ServiceSettings(model=str(snapshot)).variant_name == "tiny-a14b"
    with pytest.raises(ValueError, match="cannot tell the variant"):
        ServiceSettings(model=str(tmp_path)).variant_name
