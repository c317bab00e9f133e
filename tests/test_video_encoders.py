"""Both H.264 encoders write the same kind of file: H.264, yuv420p, the requested frames and size."""
import os

import av
import numpy as np
import pytest

from wan_model.pipeline import video


@pytest.mark.parametrize("encode", [video._encode_imageio, video._encode_pyav], ids=["imageio-ffmpeg", "pyav"])
def test_encoder_writes_h264_yuv420p(tmp_path, encode):
    frames = np.zeros((9, 48, 80, 3), np.uint8)
    frames[:, :, :40] = 200  # a left/right split survives lossy coding
    path = str(tmp_path / "v.mp4")
    encode(frames, path, 16)
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == 16
    back = video.read_mp4(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3
    # Both encoders take the same x264 settings: x264 records them in the stream (veryfast: subme=2).
    settings = open(path, "rb").read().split(b"options: ", 1)[1].split(b"\x00", 1)[0].decode()
    assert "crf=18.0" in settings and "subme=2" in settings and "me=hex" in settings, settings


@pytest.mark.parametrize("encode", [video._encode_imageio, video._encode_pyav], ids=["imageio-ffmpeg", "pyav"])
def test_encoder_converts_with_bt709_and_tags_the_stream(tmp_path, encode):
    """Players take untagged HD as BT.709: the pixels must be BT.709 and say so, or colours shift."""
    frames = np.zeros((9, 96, 128, 3), np.uint8)
    frames[:, :48] = (220, 40, 40)
    frames[:, 48:] = (60, 170, 80)
    path = str(tmp_path / "v.mp4")
    encode(frames, path, 16)
    with av.open(path) as container:
        context = container.streams.video[0].codec_context
        assert (int(context.colorspace), int(context.color_range)) == (1, 1)  # BT.709, limited ("tv")
        assert (int(context.color_primaries), int(context.color_trc)) == (1, 1)  # BT.709
        frame = next(container.decode(video=0))
        # Decoded with the BT.709 matrix, as a player reading the tags does (a BT.601 encode, ffmpeg's
        # default, comes back about 15 levels off in red and green here).
        rgb = frame.reformat(format="rgb24", src_colorspace="ITU709", src_color_range="MPEG").to_ndarray()
    for row, colour in ((20, (220, 40, 40)), (70, (60, 170, 80))):
        assert np.abs(rgb[row, 60].astype(int) - colour).max() <= 4, (rgb[row, 60], colour)


def test_write_mp4_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    def broken(frames, path, fps):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video, "_encode_imageio", broken)
    monkeypatch.setattr(video, "_encode_pyav", broken)
    with pytest.raises(OSError):
        video.write_mp4(np.zeros((1, 16, 16, 3), np.uint8), str(tmp_path / "out.mp4"), 16)
    assert list(tmp_path.iterdir()) == []


def test_write_mp4_refuses_an_encoder_that_silently_left_a_cut_file(tmp_path, monkeypatch):
    """A full disk makes ffmpeg (under imageio) drop the trailer without raising: write_mp4 must notice."""
    encode = video._encode_pyav

    def silently_truncated(frames, path, fps):
        encode(frames, path, fps)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(video, "_encode_imageio", silently_truncated)
    monkeypatch.setattr(video, "_encode_pyav", silently_truncated)
    with pytest.raises(OSError, match="incomplete video"):
        video.write_mp4(np.zeros((9, 32, 32, 3), np.uint8), str(tmp_path / "out.mp4"), 16)
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_an_ordinary_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        video.write_mp4(np.zeros((1, 16, 16, 3), np.uint8), str(tmp_path / "v.mp4"), 16)
        video.write_png(np.zeros((16, 16, 3), np.uint8), str(tmp_path / "p.png"))
    finally:
        os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}
