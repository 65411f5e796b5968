"""Every per-step trick agrees across DDP ranks: 2 CPU processes (gloo), LRSchedule + EMA + EarlyStopping + SWA."""

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _stat, run_ranks


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


def test_a_hung_rank_fails_fast_is_named_and_ended(tmp_path):
    """The bound itself: a launcher whose rank 1 sleeps for ever fails after ``hang_s`` without progress,
    names both ranks and where each waited, and leaves neither running."""
    code = (
        "import os, subprocess, sys\n"
        "rank1 = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "subprocess.Popen(rank1, env={**os.environ, 'LOCAL_RANK': '1'}).wait()\n"
    )
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as info:
        run_ranks([[sys.executable, "-c", code]], cwd=tmp_path, env=os.environ, hang_s=3)
    assert time.monotonic() - start < 30
    message = str(info.value).splitlines()[0]
    found = re.fullmatch(
        r"no progress for \d+ s \(a hang\); hung: rank 0 \(the launching process\) \(pid (\d+)\) at \S+ in \w+; "
        r"rank 1 \(pid (\d+)\) at <string>:1 in <module>; all ended now",
        message,
    )
    assert found, message
    for pid in map(int, found.groups()):
        state = _stat(pid)
        assert state is None or state[0] == "Z", (pid, state)  # ended (a zombie waits for its reaper)
