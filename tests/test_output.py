"""Output that reads well in a log file: one line per epoch, no progress-bar frames, no third-party noise."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_cli_output_to_a_file_is_one_line_per_epoch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run(
        [sys.executable, "-m", "lightning_tricks.train", "trainer.max_epochs=3", "logger=none"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert re.search(r"step 40 .*train/loss \d\.\d{4} .*val/acc \d\.\d{4} .*lr [\d.e-]+ +\d+\.\d s$", lines[1])
    assert len(lines[1].split("train/loss")) == 2  # each metric once
    assert "litlogger" not in out and "LeafSpec" not in out and "━" not in out
    assert "lightning-tricks run summary" in out
    assert len(out.encode()) < 20_000
