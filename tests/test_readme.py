"""The README's code runs as written."""

import re

from conftest import ROOT


def test_readme_callback_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example's Trainer writes checkpoints under the working directory
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### 1\. Callbacks in your own Trainer\s+```python\n(.*?)```", text, re.S).group(1)
    block = block.replace("max_epochs=10,", "max_epochs=3, enable_progress_bar=False, logger=False,")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step > 0
    assert trainer.callback_metrics["test/acc"] > 0.5  # three epochs on digits learn a lot already
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert all(lr < 0.05 for lr in lrs)  # the cosine schedule has moved the LR down from its base
