"""Run by tests/test_ddp.py: 2 CPU processes (gloo) with LRSchedule + EMA + EarlyStopping + SWA.

Early stopping monitors each rank's own validation loss (not synced), so the ranks see different curves
and only rank zero's broadcast makes them decide alike.

Lightning's DDP launcher re-runs this script for rank 1. Each rank records its LR sequence, its EMA
and SWA averages and its stop epoch, all-gathers the averages to compare them bit for bit across
ranks, and writes what it saw to ``OUT/rank{r}.pt``.
"""

import sys

import torch
import torch.distributed as dist

from lightning_tricks._lightning import Callback, Trainer, seed_everything
from lightning_tricks.callbacks import EMA, SWA, EarlyStopping, LRSchedule
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.schedules import Cosine, Warmup
from lightning_tricks.stopping import GL


class RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


class ShardLoss(Classifier):
    """Also logs this rank's own validation loss, not synced: the ranks see different curves."""

    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)
        self.log("val/rank_loss", loss, on_step=False, on_epoch=True, sync_dist=False, batch_size=batch[0].shape[0])
        return loss


class RecordLocal(Callback):
    def __init__(self):
        self.values = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val/rank_loss"]))


def flat(tensors):
    return torch.cat([t.detach().float().flatten().cpu() for t in tensors])


def main(out):
    torch.set_num_threads(1)
    seed_everything(0)
    # overfits: a tiny training set and a wide net without regularization, so validation loss rises
    dm = DigitsDataModule(batch_size=16, val_fraction=0.5, loader="resident")
    module = ShardLoss(MLP((1, 8, 8), 10, hidden=(256,), norm="none"), 10, {"name": "sgd", "lr": 0.3, "momentum": 0.9})
    ema = EMA(decay=0.9, average_at_end=False)
    swa = SWA(start=1, bn_update=False, average_at_end=False)
    # decides on each rank's own (unsynced) loss: rank zero's values must reach every rank
    stop = EarlyStopping(monitor="val/rank_loss", criterion=GL(alpha=0.5), restore_best=False)
    record = RecordLR()
    local = RecordLocal()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=12,
        limit_train_batches=10,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[LRSchedule(Warmup(steps=4, then=Cosine())), ema, swa, stop, record, local],
    )
    trainer.fit(module, dm)
    ema_w = flat(ema.state_dict()["average"].values())
    swa_w = flat(swa.state_dict()["average"].values())
    gathered = {}
    for name, t in (
        ("ema", ema_w),
        ("swa", swa_w),
        ("lrs", torch.tensor(record.lrs, dtype=torch.float64)),
        ("stop", torch.tensor([trainer.current_epoch, stop.stopped_epoch])),
    ):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        gathered[name] = parts
    torch.save(
        {
            "rank": trainer.global_rank,
            "lrs": record.lrs,
            "ema": ema_w,
            "swa": swa_w,
            "stopped_epoch": stop.stopped_epoch,
            "current_epoch": trainer.current_epoch,
            "stop_reason": stop.stop_reason,
            "gathered": gathered,
            "global_step": trainer.global_step,
            "history": list(stop.history),
            "local": local.values,
        },
        f"{out}/rank{trainer.global_rank}.pt",
    )
    # end the gloo group before the interpreter exits: left to exit, its threads sometimes abort the process
    # ("terminate called without an active exception", return code -6) after a correct run
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
