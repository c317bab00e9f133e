"""Image-to-video conditioning, as the official pipelines build it.

* Wan2.1 I2V-14B / Wan2.2 I2V-A14B (``wan/image2video.py``): ``y = [frame mask (4 channels);
  VAE latent of (image, then zero frames)]`` concatenated to the noisy latents on channels;
  Wan2.1 also feeds CLIP features of the image to the transformer's image branch.
* Wan2.2 TI2V-5B (``wan/textimage2video.py``): the first latent frame *is* the image latent,
  held fixed, with timestep 0 on its tokens (see ``denoise.FirstFrameLock``).

The image is resized to cover the requested size and center-cropped (aspect ratio kept). A request
without width and height gets the variant's default area in the image's own aspect ratio
(``size_for_image``, or ``closest_ratio_size`` for TI2V), so nothing but the rounding to the size
multiple is cropped.
"""
from __future__ import annotations

import io
import math

import torch

from .denoise import FirstFrameLock


# The largest input image decoded (8192 x 8192): the video is at most 4096 a side, so more only costs
# memory and time. PIL's own bomb check refuses only above 179 M pixels, and merely warns above 89 M.
MAX_IMAGE_PIXELS = 8192 * 8192


def decode_image(data: bytes):
    """Encoded PNG/JPEG/... bytes -> RGB ``PIL.Image``; raises ``ValueError`` naming the problem."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ValueError("the image is empty")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"the image is {image.width}x{image.height}, {image.width * image.height / 1e6:.0f} "
                             f"megapixels; the most is {MAX_IMAGE_PIXELS / 1e6:.0f} (8192x8192): scale it down")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode the image ({exc})") from None
    # A phone photo is stored sideways with an EXIF orientation: turn it upright first, as diffusers'
    # load_image does (sizing the video from its aspect ratio depends on it too).
    return ImageOps.exif_transpose(image).convert("RGB")


def size_for_image(image_width: int, image_height: int, area: int, multiple: int) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels with the image's aspect ratio, each side rounded down
    to ``multiple`` (at least one ``multiple``), as official Wan2.1 image-to-video sizes its output."""
    aspect = image_height / image_width
    height = max(multiple, int(math.sqrt(area * aspect) // multiple) * multiple)
    width = max(multiple, int(math.sqrt(area / aspect) // multiple) * multiple)
    return width, height


def closest_ratio_size(image_width: int, image_height: int, area: int, multiple: int) -> tuple[int, int]:
    """(width, height) of at most ``area`` pixels, multiples of ``multiple``, whose aspect ratio is the
    closest to the image's, as official Wan2.2 TI2V sizes its output: round the width down first and
    fit the height to the area, or the height first and fit the width, and keep the closer ratio."""
    ratio = image_width / image_height
    exact_width = math.sqrt(area * ratio)

    def fit(first: float) -> tuple[int, int]:
        side = max(multiple, int(first // multiple) * multiple)
        return side, max(multiple, int(area / side // multiple) * multiple)

    width_first = fit(exact_width)
    height, width = fit(area / exact_width)
    # On a tie the height-first size wins, as official.
    candidates = [(width, height), width_first]
    return min(candidates, key=lambda size: max(ratio * size[1] / size[0], size[0] / (ratio * size[1])))


def image_to_tensor(image, width: int, height: int, resample: str = "bicubic") -> torch.Tensor:
    """Resize to cover ``width`` x ``height``, center-crop, scale to [-1, 1]: ``[3, H, W]`` float32.
    ``resample``: PIL's ``bicubic``, or ``lanczos`` (official Wan2.2 TI2V resizes its image so)."""
    from PIL import Image
    import numpy as np

    filters = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
    if resample not in filters:
        raise ValueError(f"resample must be one of {', '.join(filters)}, got {resample!r}")
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           filters[resample])
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32).copy())  # [H, W, 3] in 0..255
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def first_frame_mask(num_frames: int, lat_h: int, lat_w: int, temporal_stride: int = 4) -> torch.Tensor:
    """The official 4-channel frame mask ``[4, F_lat, lat_h, lat_w]``: 1 where a frame is given.

    One mask value per video frame (only frame 0 is given); the first frame is repeated
    ``temporal_stride`` times so the ``1 + 4k`` frames fold into ``F_lat`` groups of 4.
    """
    mask = torch.ones(1, num_frames, lat_h, lat_w)
    mask[:, 1:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(temporal_stride, dim=1), mask[:, 1:]], dim=1)
    mask = mask.view(1, mask.shape[1] // temporal_stride, temporal_stride, lat_h, lat_w)
    return mask.transpose(1, 2)[0]


def i2v_video(image: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The video the I2V VAE encodes: ``image`` (``[3, H, W]`` in [-1, 1]), then ``num_frames - 1``
    zero frames: ``[1, 3, F, H, W]``."""
    _, height, width = image.shape
    video = torch.zeros(1, 3, num_frames, height, width, dtype=image.dtype, device=image.device)
    video[0, :, 0] = image
    return video


def i2v_y(latent: torch.Tensor, num_frames: int, vae_stride: tuple[int, int, int]) -> torch.Tensor:
    """``y`` for the I2V transformers, ``[1, 4 + z, F_lat, lat_h, lat_w]``: the frame mask, then the
    normalized latents of ``i2v_video``."""
    lat_h, lat_w = latent.shape[-2:]
    mask = first_frame_mask(num_frames, lat_h, lat_w, vae_stride[0]).to(latent.device, latent.dtype)
    return torch.cat([mask.unsqueeze(0), latent], dim=1)


def ti2v_lock(image_latent: torch.Tensor, latent_shape: tuple[int, ...], patch_size: tuple[int, int, int]
              ) -> FirstFrameLock:
    """The TI2V first-frame lock for ``latents`` of ``latent_shape`` ``[1, C, F_lat, h, w]``, from the
    image's normalized latent ``[1, C, 1, h, w]``."""
    if tuple(image_latent.shape[-2:]) != tuple(latent_shape[-2:]) or image_latent.shape[1] != latent_shape[1]:
        raise ValueError(f"image latent {tuple(image_latent.shape)} does not fit latents {tuple(latent_shape)}")
    mask = torch.ones(latent_shape, dtype=torch.float32, device=image_latent.device)
    mask[:, :, 0] = 0
    return FirstFrameLock(image_latent=image_latent.float(), mask=mask, patch_size=patch_size)
