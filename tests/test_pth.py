"""Official .pth checkpoints (T5, CLIP, VAE) load whether torch wrote them in its zip format or in the
older one, which cannot be memory-mapped."""
from __future__ import annotations

import zipfile

import pytest
import torch

from wan_model.pipeline.clip import load_clip_vision
from wan_model.pipeline.model_dir import detect_model_dir
from wan_model.pipeline.pth import load_pth
from wan_model.pipeline.text_encoder import load_umt5_encoder
from wan_model.pipeline.tiny import build_tiny_model_dir
from wan_model.pipeline.vae import load_vae_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return detect_model_dir(build_tiny_model_dir(tmp_path_factory.mktemp("pth") / "i2v", "tiny-i2v", "official"))


@pytest.mark.parametrize("part,load", [("text_encoder", load_umt5_encoder), ("clip", load_clip_vision),
                                       ("vae", load_vae_model)])
def test_the_older_pth_format_loads_to_the_same_weights(files, tmp_path, part, load):
    path = getattr(files, part)
    assert zipfile.is_zipfile(path)
    legacy = tmp_path / path.name
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    expected, got = load(path).state_dict(), load(legacy).state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_a_pth_that_is_not_a_state_dict_is_named(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="tensor.pth holds a Tensor, not a state dict"):
        load_pth(path)
