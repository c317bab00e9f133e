"""torch.compile's on-disk cache in the folder the service names (``wan_model.compile.use_cache_dir``).

A new process (a replacement replica, a scaled-up one) that compiles the same block in the same
folder loads the graph instead of compiling it, and computes the same output. Each process gets its
own empty stand-in for torch's default folder (``TORCHINDUCTOR_CACHE_DIR``), so a setting that was
ignored would leave the named folder empty and find nothing in the second process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_model.compile import use_cache_dir

REPO = Path(__file__).resolve().parents[1]

COMPILE_ONCE = """
import json, sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
from wan_model.compile import compile_blocks, compile_stats, use_cache_dir
use_cache_dir(sys.argv[1])
from test_perf_levers import tiny_model
model, inputs = tiny_model()
compile_blocks(model)
with torch.no_grad():
    out = model(*inputs)
torch.save(out, sys.argv[2])
print("STATS " + json.dumps(compile_stats()))
"""


def compile_in_new_process(cache: Path, default: Path, out: Path) -> dict:
    script = COMPILE_ONCE.format(repo=str(REPO), tests=str(REPO / "tests"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(default)}
    done = subprocess.run([sys.executable, "-c", script, str(cache), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("STATS "))
    return json.loads(line[len("STATS "):])


def test_a_new_process_loads_the_compiled_block_from_the_named_folder(tmp_path):
    cache = tmp_path / "compile-cache"
    first = compile_in_new_process(cache, tmp_path / "default-1", tmp_path / "first.pt")
    assert first["graphs"] >= 1 and first["from_cache"] == 0, first
    assert (cache / "fxgraph").is_dir()
    assert not (tmp_path / "default-1" / "fxgraph").exists()  # nothing went to torch's own folder

    second = compile_in_new_process(cache, tmp_path / "default-2", tmp_path / "second.pt")
    assert second["graphs"] == first["graphs"] and second["from_cache"] == second["graphs"], second
    torch.testing.assert_close(torch.load(tmp_path / "second.pt"), torch.load(tmp_path / "first.pt"), rtol=0, atol=0)


def test_a_folder_that_cannot_be_written_is_named_in_the_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with pytest.raises(ValueError, match="a-file/cache.*cannot be written"):
        use_cache_dir(str(blocker / "cache"))
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before  # left as it was

