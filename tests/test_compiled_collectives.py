"""What ``torch.compile`` makes of a block with sequence parallelism (issue #6, ninth session).

* Kernel choice (``fast_kernel``, ``kernel_problem``) runs inside compiled blocks. On a GPU its checks
  (imports, the compute capability) are not traceable, and the block used to be compiled in five
  pieces around the attention call. Here a check that forces a graph break stands in for them: the
  choice must still be a constant of one graph.
* On 2 gloo ranks with Ulysses 2, a compiled block is one graph for every block, in which all three
  q/k/v all-to-alls are issued before the first wait with a projection GEMM between, and the
  output's all-to-all has the context projections of the cross-attention behind it (Inductor's comm
  passes, ``wan_model.compile.COMM_OVERLAP``); the output equals eager.
"""
from __future__ import annotations

import re

import torch

from _dist import run_ranks
from wan_model.parallel import fa3, kernels


def test_kernel_choice_is_a_constant_of_one_compiled_graph(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    real_check = fa3.check
    checks = []

    def untraceable_check(*args, **kwargs):
        checks.append(args)
        torch._dynamo.graph_break()  # stands for what Dynamo cannot trace on a GPU machine
        return real_check(*args, **kwargs)

    monkeypatch.setattr(fa3, "check", untraceable_check)
    cuda = torch.device("cuda", 0)  # a device object only: no CUDA is touched before the import check fails

    def attend(q: torch.Tensor) -> torch.Tensor:
        q = q + 1  # work on both sides of the choice: a break between them makes two graphs
        auto = kernels.fast_kernel(cuda, q.dtype, q.shape[-1])  # fa3.usable -> fa3.check
        problem = kernels.kernel_problem("fa3", cuda, q.dtype, q.shape[-1])
        return q * 2 if auto != "fa3" and problem is not None else q * 3

    torch._dynamo.reset()
    counter = CompileCounter()
    q = torch.ones(2, 8, dtype=torch.bfloat16)
    out = torch.compile(attend, backend=counter)(q)
    assert checks, "the stand-in check was never called"
    assert counter.frame_count == 1, f"kernel choice split the graph into {counter.frame_count} pieces"
    assert torch.equal(out, (q + 1) * 2)  # fa3-fwd is not installed here: no fast kernel, and a stated problem
    # The same answers outside torch.compile, and the named kernel still raises with the reason.
    assert kernels.fast_kernel(cuda, torch.bfloat16, 8) is None
    try:
        kernels.resolve_kernel_name("fa3", cuda, torch.bfloat16, 8)
    except ValueError as exc:
        assert "fa3-fwd" in str(exc)
    else:
        raise AssertionError("fa3 without its package must raise")


def _compiled_block_schedule(rank: int, world_size: int) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from test_perf_levers import tiny_model
    from wan_model.compile import compile_blocks
    from wan_model.parallel.degrees import ParallelConfig
    from wan_model.parallel.groups import setup_sequence_parallel

    state = setup_sequence_parallel(ParallelConfig(ulysses=world_size))
    model, inputs = tiny_model()
    model.set_parallel(state.sharding(), state.attention(kernel="cpu"))
    with torch.no_grad():
        eager = model(*inputs)
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model)
        compiled, codes = run_and_get_code(model, *inputs)
    schedules = []
    for code in codes:
        body = code[code.index("def call(self, args)"):]
        events = []
        for line in body.splitlines():
            if "all_to_all_single.default(" in line:
                events.append("start")
            elif "wait_tensor.default(" in line:
                events.append("wait")
            elif re.search(r"extern_kernels\.(addmm|mm)\(", line):
                events.append("gemm")
        schedules.append(events)
    return {"graph_breaks": sum(counters["graph_break"].values()), "schedules": schedules,
            "max_diff": (compiled - eager).abs().max().item()}


def test_compiled_ulysses_block_is_one_graph_with_the_transfers_behind_a_projection():
    for result in run_ranks(_compiled_block_schedule, 2, timeout=300):
        assert result["graph_breaks"] == 0
        assert result["max_diff"] < 1e-5
        block_schedules = [s for s in result["schedules"] if s.count("start") == 4]  # q, k, v, output
        assert len(block_schedules) == 1, result["schedules"]  # every block runs the one graph
        events = block_schedules[0]
        first_wait = events.index("wait")
        starts_before_wait = events[:first_wait].count("start")
        assert starts_before_wait == 3, f"q, k and v must all be in flight before the first wait: {events}"
        first_start = events.index("start")
        assert "gemm" in events[first_start:first_wait], f"no projection runs behind the transfers: {events}"
        # The output's transfer: the cross-attention's context projections run behind it (the comm passes).
        output_start = [i for i, e in enumerate(events) if e == "start"][3]
        next_wait = events.index("wait", output_start)
        assert "gemm" in events[output_start:next_wait], f"nothing runs behind the output transfer: {events}"
