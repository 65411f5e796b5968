"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default dataset."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_tricks.data.base import TensorDataModule


class DigitsDataModule(TensorDataModule):
    """Digits from ``sklearn.datasets.load_digits`` (ships inside scikit-learn, no download).

    A stratified-by-shuffle split: ``test_fraction`` of the images for test (fixed ``split_seed``),
    ``val_fraction`` of the rest for validation. Images are ``(1, 8, 8)``: the 17 grey levels ``0..16``
    as pixels ``v / 16`` in ``[0, 1]``, normalized with the training split's statistics (``normalize``).
    Flips are off by default (``flip``): a mirrored 2, 3, 5 or 7 is not that digit.
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    default_flip = False

    def __init__(self, test_fraction: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.test_fraction = test_fraction

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # grey levels 0..16 -> [0, 1]
        y = torch.tensor(d.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed + 1))
        n_test = int(round(len(y) * self.test_fraction))
        test, train = perm[:n_test], perm[n_test:]
        return {"train": (x[train], y[train]), "test": (x[test], y[test])}
