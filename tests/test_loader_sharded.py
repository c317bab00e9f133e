"""Loading a transformer straight into FSDP2 shards (``load_transformer(shard=...)``), on 3 gloo ranks.

This is how ``fsdp: true`` loads: the model is sharded while still on ``meta`` and each rank keeps
only its rows of every checkpoint tensor, so no rank ever holds the whole model on its device (a
14B expert is 28.6 GB, more than a 24 GB card). Three ranks make uneven shards (a dimension of 32
rows splits 11/11/10, the 1-row modulation tables sit on rank 0 alone).
"""
from __future__ import annotations

import pytest
import torch

from _dist import run_ranks
from test_loader import _random_model
from wan_model.loader import load_transformer, local_part, save_transformer

pytestmark = pytest.mark.slow


def _load_sharded(rank: int, world_size: int, root: str, dtype_name: str) -> dict:
    import torch.distributed as dist

    from wan_model.pipeline.fsdp import is_sharded, local_parameter_bytes, shard_transformer

    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    out = {}
    for layout in ("official", "diffusers"):
        whole = load_transformer(f"{root}/{layout}", device=device, dtype=dtype)
        sharded = load_transformer(f"{root}/{layout}", device=device, dtype=dtype,
                                   shard=lambda model: shard_transformer(model, device))
        whole_params = dict(whole.named_parameters())
        mismatched, not_dtensor, wrong_dtype = [], [], []
        rows = torch.zeros(1, dtype=torch.float64)
        for name, param in sharded.named_parameters():
            if not hasattr(param, "to_local"):
                not_dtensor.append(name)
                continue
            local = param.to_local()
            if local.dtype != dtype:
                wrong_dtype.append(name)
            if not torch.equal(local, local_part(param, whole_params[name].detach())):
                mismatched.append(name)
            rows += local.numel()
        dist.all_reduce(rows)  # the shards of all ranks together hold every element exactly once
        out[layout] = {
            "sharded": is_sharded(sharded), "mismatched": mismatched, "not_dtensor": not_dtensor,
            "wrong_dtype": wrong_dtype, "elements_over_ranks": int(rows.item()),
            "elements": sum(p.numel() for p in whole.parameters()),
            "local_bytes": local_parameter_bytes(sharded), "whole_bytes": local_parameter_bytes(whole),
            "has_checkpoint_source": hasattr(sharded, "checkpoint_source"),
        }
    return out


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_each_rank_loads_exactly_its_shard(tmp_path, dtype_name) -> None:
    model = _random_model("tiny-i2v")  # float32 on disk: bfloat16 also checks the cast on the way in
    save_transformer(model, tmp_path / "official", layout="official")
    save_transformer(model, tmp_path / "diffusers", layout="diffusers")
    ranks = run_ranks(_load_sharded, 3, str(tmp_path), dtype_name, timeout=180)
    for rank, result in enumerate(ranks):
        for layout, row in result.items():
            where = f"rank {rank}, {layout}"
            assert row["sharded"], where
            assert row["not_dtensor"] == [] and row["wrong_dtype"] == [] and row["mismatched"] == [], where
            assert row["elements_over_ranks"] == row["elements"], where
            # About a third of the weights each (uneven rows add a little), never the whole model.
            assert row["local_bytes"] < 0.4 * row["whole_bytes"], where
            assert row["has_checkpoint_source"], where
