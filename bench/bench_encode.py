"""H.264 encode time, size and PSNR per x264 preset (CPU; no GPU needed).

81 synthetic frames (moving colour waves plus fixed texture) at 1280x720 through PyAV's libx264 at
crf 18, as ``wan_model.pipeline.video`` writes them; PSNR of the decoded frames against the input.

    python3 bench/bench_encode.py [--presets medium,fast,veryfast] [--width 1280 --height 720]
"""
from __future__ import annotations

import argparse
import io
import time

import av
import numpy as np


def synthetic_frames(frames: int, height: int, width: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.random.default_rng(0).normal(0, 6, (height, width, 3)).astype(np.float32)
    out = []
    for t in range(frames):
        rgb = np.stack([127 + 100 * np.sin((xx + 4 * t) / 90.0), 127 + 100 * np.cos((yy - 3 * t) / 70.0),
                        127 + 80 * np.sin((xx + yy + 5 * t) / 130.0)], axis=-1)
        out.append(np.clip(rgb + texture, 0, 255).astype(np.uint8))
    return out


def encode(frames: list[np.ndarray], preset: str, fps: int = 16) -> tuple[float, float, float]:
    """(seconds, MB, PSNR dB)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": preset}
        start = time.perf_counter()
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        seconds = time.perf_counter() - start
    size_mb = len(buffer.getvalue()) / 1e6
    buffer.seek(0)
    with av.open(buffer) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    mse = np.mean([(a.astype(np.float32) - b.astype(np.float32)) ** 2 for a, b in zip(decoded, frames)])
    return seconds, size_mb, 10 * np.log10(255**2 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="medium,fast,veryfast")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    args = p.parse_args()
    frames = synthetic_frames(args.frames, args.height, args.width)
    print("| preset | encode s | MB | PSNR dB |\n|---|---|---|---|")
    for preset in args.presets.split(","):
        seconds, size_mb, psnr = encode(frames, preset)
        print(f"| {preset} | {seconds:.2f} | {size_mb:.2f} | {psnr:.2f} |")


if __name__ == "__main__":
    main()
