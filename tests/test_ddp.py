"""Every per-step trick agrees across DDP ranks: 2 CPU processes (gloo), LRSchedule + EMA + EarlyStopping + SWA."""

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_ranks


@pytest.mark.ddp
@pytest.mark.slow
def test_tricks_agree_across_two_ddp_ranks(tmp_path):
    worker = Path(__file__).with_name("ddp_tricks_worker.py")
    path = os.pathsep.join(p for p in (str(worker.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    (r,) = run_ranks([[sys.executable, str(worker), str(tmp_path)]], cwd=tmp_path, env=env)  # a hang fails in ~1 min
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1)]
    a, b = ranks
    assert (a["rank"], b["rank"]) == (0, 1)
    # same LR sequence, set per optimizer step (warmup then cosine), on both ranks
    assert len(a["lrs"]) == a["global_step"] > 4 and a["lrs"] == b["lrs"]
    assert a["lrs"][0] < a["lrs"][3]  # warming up
    # the averages, gathered from both ranks, are bit-identical
    for name in ("ema", "swa"):
        first, second = a["gathered"][name]
        assert torch.equal(first, second), name
        assert torch.equal(a[name], b[name])
    assert not torch.equal(a["ema"], a["swa"])
    # the ranks saw different validation curves (their own shards); both decided on rank zero's
    assert len(a["local"]) == len(b["local"]) > 1 and a["local"] != b["local"]
    assert a["history"] == b["history"] == a["local"]
    # the run stopped early, on the same epoch on both ranks, for a reason both can read
    assert a["stopped_epoch"] == b["stopped_epoch"] > 0
    assert a["current_epoch"] == b["current_epoch"] < 12
    assert torch.equal(*a["gathered"]["stop"])
    assert a["stop_reason"] and "GL=" in a["stop_reason"]
