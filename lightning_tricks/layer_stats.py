"""Per-layer statistics of activations and gradients, as pure functions (no Trainer).

CS231n ("Training Neural Networks I", the activation-histogram demo): plot, for each layer,
the distribution of its outputs and of its gradients. Activations that collapse to zero (weights too
small), saturate (too large, tanh/sigmoid at +-1), or ReLU units that never fire show up there long
before the loss says anything. This module measures, for one forward/backward pass:

- per layer, the mean and standard deviation of its output (population std, ``correction=0``, as
  ``numpy.std``), the fraction of outputs that are exactly zero and, for ReLU-type modules, the fraction
  of *dead units*: units (dim 1: features of ``(N, C)``, channels of ``(N, C, ...)``) that are zero for
  every sample and position of the batch (:func:`lightning_tricks.sanity.relu_stats`, shared with
  ``DeadUnitMonitor``);
- per parameterized layer, the norm of its gradient and of its weights, each over all its own
  parameters together (``sqrt(sum ||g_t||^2)``; per-tensor norms from one ``torch._foreach_norm``, via
  :func:`lightning_tricks.sanity.grad_norms`);
- evenly strided samples of the outputs and gradients for histograms.

Which layers (:func:`select_layers`): every module with parameters of its own (``recurse=False``: in
practice the leaf layers, ``Linear``, ``ConvNd``, norms, ``Embedding``; a container holding a raw
``nn.Parameter`` counts too, with its whole output) and every activation module in
:data:`ACTIVATION_TYPES` (``nn.ReLU``, ``GELU``, ``Tanh``, ...). Activations applied as functions
(``F.relu``) have no module and are not seen. A module called several times in one forward pass gets
the mean of its per-call statistics and the samples of all calls.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    >>> [(layer.name, layer.dead_units, len(layer.params)) for layer in select_layers(net)]
    [('0', False, 2), ('1', True, 0)]
    >>> activation_stats(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), dead_units=True)
    tensor([1.0000, 1.2247, 0.5000, 0.5000])
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks.checks import check_int
from lightning_tricks.sanity import grad_norms, relu_stats

__all__ = [
    "ACTIVATION_TYPES",
    "DEAD_UNIT_TYPES",
    "COLUMNS",
    "Layer",
    "ActivationRecorder",
    "LayerMeasurement",
    "select_layers",
    "activation_stats",
    "subsample",
    "layer_norms",
    "param_norms",
    "measure",
    "write_csv",
    "plot_histograms",
]

#: Activation modules measured even though they hold no parameters.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
)
#: Activations whose exact zero means "unit off": the dead-unit fraction is reported for these only.
DEAD_UNIT_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)

#: The activation statistics, in the order of :func:`activation_stats`.
ACT_STATS = ("act_mean", "act_std", "act_zero_frac", "dead_frac")
#: The columns of ``layer_stats.csv`` (:func:`write_csv`).
COLUMNS = ("step", "epoch", "layer", "type", "calls", *ACT_STATS, "grad_norm", "weight_norm")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One measured module: its name in ``named_modules()``, its own trainable parameters, dead-unit flag."""

    name: str
    module: nn.Module
    params: tuple[nn.Parameter, ...]
    dead_units: bool

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def select_layers(module: nn.Module) -> list[Layer]:
    """The modules of ``module`` to measure (see the module doc), in ``named_modules()`` order.

    ``params`` are each layer's own parameters with ``requires_grad`` (frozen ones have no gradient).
    The root module is named ``"<root>"`` if it qualifies.
    """
    layers = []
    for name, m in module.named_modules():
        own = tuple(m.parameters(recurse=False))
        if own or isinstance(m, ACTIVATION_TYPES):
            trainable = tuple(p for p in own if p.requires_grad)
            layers.append(Layer(name or "<root>", m, trainable, isinstance(m, DEAD_UNIT_TYPES)))
    return layers


def activation_stats(out: Tensor, dead_units: bool) -> Tensor:
    """``[mean, std, zero_fraction, dead_fraction]`` of a layer output, a float32 vector on its device.

    ``std`` is the population std (``correction=0``); ``dead_fraction`` is the fraction of units (dim 1)
    zero for every sample and position (:func:`~lightning_tricks.sanity.relu_stats`), ``nan`` when
    ``dead_units`` is false (the module is not ReLU-type, so a zero does not mean "off").

    Example:
        >>> activation_stats(torch.tensor([[1.0, -1.0], [3.0, -3.0]]), dead_units=False)
        tensor([0.0000, 2.2361, 0.0000,    nan])
    """
    x = out.detach().float()
    std, mean = torch.std_mean(x, correction=0)
    zero, dead = relu_stats(x)
    if not dead_units:
        dead = torch.full_like(dead, math.nan)
    return torch.stack([mean, std, zero, dead])


def subsample(tensors: Tensor | Sequence[Tensor], max_values: int) -> Tensor:
    """At most ``max_values`` evenly strided values of the flattened tensor(s), as a new float32 vector.

    One stride for every tensor of the list, so each contributes in proportion to its size: the smallest
    integer ``>= ceil(total / max_values)`` that is coprime with the size of each tensor's slices along
    dim 0 (a row of a weight, one sample of an activation), so the samples visit every unit and position
    rather than, with stride 2 over ``(N, 256)``, only the even features. Deterministic: no RNG. The
    result is a copy: later in-place changes of the inputs (an in-place ReLU after a ``Linear``) do not
    reach it.

    Example:
        >>> subsample(torch.arange(10.0), 4)
        tensor([0., 3., 6., 9.])
        >>> subsample(torch.arange(12.0).reshape(3, 4), 6)   # stride 3, not 2: every column is visited
        tensor([0., 3., 6., 9.])
    """
    check_int("max_values", max_values, 1)
    parts = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    total = sum(t.numel() for t in parts)
    if total == 0:
        return torch.zeros(0)
    stride = max(1, math.ceil(total / max_values))
    periods = {t.numel() // t.shape[0] for t in parts if t.ndim >= 2 and t.shape[0]}
    while stride > 1 and any(math.gcd(stride, p) != 1 for p in periods):
        stride += 1
    flat = [t.detach().reshape(-1)[::stride] for t in parts]
    return torch.cat([f.float() for f in flat]) if len(flat) > 1 else flat[0].to(torch.float32, copy=True)


def layer_norms(tensor_norms: Tensor, layer_of: Tensor, num_layers: int) -> Tensor:
    """Per-layer norm ``sqrt(sum of tensor_norms[t]^2 over the tensors t of the layer)``; ``nan`` for a layer with none.

    Example:
        >>> layer_norms(torch.tensor([3.0, 4.0, 2.0]), torch.tensor([0, 0, 2]), 3)
        tensor([5., nan, 2.])
    """
    norms = tensor_norms.float()
    squares = torch.zeros(num_layers, dtype=torch.float32, device=norms.device)
    squares.index_add_(0, layer_of.to(norms.device), norms.square())
    present = torch.zeros(num_layers, dtype=torch.bool, device=norms.device)
    present[layer_of.to(norms.device)] = True
    return torch.where(present, squares.sqrt(), math.nan)


def param_norms(layers: Sequence[Layer]) -> tuple[Tensor, Tensor]:
    """``(grad_norm, weight_norm)`` per layer (float32 vectors): over each layer's own trainable parameters.

    A parameter without a gradient (unused in the pass) counts as a zero gradient, as in
    :func:`~lightning_tricks.sanity.grad_norms`; a layer without trainable parameters (an activation, a
    frozen layer) gets ``nan`` for both. One multi-tensor norm each, no host sync.
    """
    params = [p for layer in layers for p in layer.params]
    if not params:
        nan = torch.full((len(layers),), math.nan)
        return nan, nan.clone()
    layer_of = torch.tensor([i for i, layer in enumerate(layers) for _ in layer.params])
    per_grad, _ = grad_norms(params)
    weights = torch._foreach_norm([p.detach() for p in params], 2, dtype=torch.float32)
    device = per_grad.device
    per_weight = torch.stack([w.to(device) for w in weights])
    return layer_norms(per_grad, layer_of, len(layers)), layer_norms(per_weight, layer_of, len(layers))


class ActivationRecorder:
    """Forward hooks on the layers' modules that record :func:`activation_stats` and histogram samples.

    :meth:`start` registers one forward hook per module, :meth:`stop` removes them all (the modules'
    ``_forward_hooks`` are as before). In between, every forward call of a measured module appends its
    statistics (device tensors: no host sync) and, with ``max_values > 0``, a strided sample of its
    output. Outputs that are not floating-point tensors are ignored.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> recorder = ActivationRecorder(select_layers(net), max_values=0)
        >>> recorder.start(); _ = net(torch.ones(4, 2)); recorder.stop()
        >>> recorder.calls, len(net[0]._forward_hooks)
        ([1, 1], 0)
    """

    def __init__(self, layers: Sequence[Layer], max_values: int = 10_000) -> None:
        self.layers = list(layers)
        self.max_values = int(max_values)
        self.stats: list[list[Tensor]] = [[] for _ in self.layers]
        self.samples: list[list[Tensor]] = [[] for _ in self.layers]
        self._handles: list[Any] = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def calls(self) -> list[int]:
        return [len(s) for s in self.stats]

    def start(self) -> None:
        self.stop()
        self.stats = [[] for _ in self.layers]
        self.samples = [[] for _ in self.layers]
        self._handles = [layer.module.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, i: int) -> Any:
        dead = self.layers[i].dead_units

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not (isinstance(out, Tensor) and out.is_floating_point() and out.numel()):
                return
            with torch.no_grad():
                self.stats[i].append(activation_stats(out, dead))
                if self.max_values > 0:
                    self.samples[i].append(subsample(out, self.max_values))

        return hook

    def activation_table(self) -> Tensor:
        """``(num_layers, 4)`` float32: the mean over calls of each layer's statistics; ``nan`` rows if never called."""
        device = next((s[0].device for s in self.stats if s), torch.device("cpu"))
        rows = [
            torch.stack(s).mean(0).to(device) if s else torch.full((4,), math.nan, device=device) for s in self.stats
        ]
        if not rows:
            return torch.zeros(0, 4)
        return torch.stack(rows)


@dataclasses.dataclass
class LayerMeasurement:
    """One measurement: a row per layer (``COLUMNS``) and the host-side histogram samples per layer name.

    In a row, a statistic that does not apply is ``None`` (no dead-unit fraction for a non-ReLU module,
    no gradient norm for an activation module, no activation statistics for a module not called), so a
    ``nan`` always means a measured non-finite value.
    """

    rows: list[dict[str, Any]]
    activations: dict[str, Tensor]
    gradients: dict[str, Tensor]


def measure(
    recorder: ActivationRecorder, step: int, epoch: int = 0, gradients: bool = True, max_values: int = 10_000
) -> LayerMeasurement:
    """Assemble the recorded activation statistics, the gradient/weight norms and the samples on the host.

    Call after the backward pass (the gradients are read from ``.grad``); ``gradients=False`` leaves
    them out (no gradient norm, no gradient samples). One device-to-host transfer for the table and one
    for all samples.
    """
    layers = recorder.layers
    act = recorder.activation_table()
    if gradients:
        grad, weight = param_norms(layers)
    else:
        _, weight = param_norms(layers)
        grad = torch.full_like(weight, math.nan)
    device = act.device
    table = torch.cat([act, grad.to(device)[:, None], weight.to(device)[:, None]], dim=1).tolist() if layers else []
    calls = recorder.calls
    rows = []
    for layer, n, values in zip(layers, calls, table):
        mean, std, zero, dead, g, w = values
        has_params = bool(layer.params)
        rows.append(
            {
                "step": step,
                "epoch": epoch,
                "layer": layer.name,
                "type": layer.kind,
                "calls": n,
                "act_mean": mean if n else None,
                "act_std": std if n else None,
                "act_zero_frac": zero if n else None,
                "dead_frac": dead if n and layer.dead_units else None,
                "grad_norm": g if has_params and gradients else None,
                "weight_norm": w if has_params else None,
            }
        )
    names, parts = [], []
    for layer, samples in zip(layers, recorder.samples):
        if samples:
            names.append(("act", layer.name))
            parts.append(torch.cat([s.to(device) for s in samples]))
        if gradients and max_values > 0:
            grads = [p.grad for p in layer.params if p.grad is not None]
            if grads:
                names.append(("grad", layer.name))
                parts.append(subsample(grads, max_values).to(device))
    activations: dict[str, Tensor] = {}
    gradient_samples: dict[str, Tensor] = {}
    if parts:
        host = torch.cat(parts).cpu().split([p.numel() for p in parts])
        for (kind, name), values in zip(names, host):
            (activations if kind == "act" else gradient_samples)[name] = values
    return LayerMeasurement(rows, activations, gradient_samples)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Append ``rows`` to the CSV at ``path`` (header ``COLUMNS`` written when the file is new); returns the path.

    ``None`` becomes an empty cell (the statistic does not apply); a non-finite value is written as ``nan``/``inf``.
    """
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def plot_histograms(
    panels: Sequence[tuple[str, Tensor]], path: str | os.PathLike, title: str = "", bins: int = 50, ncols: int = 4
) -> str:
    """A grid of histograms, one panel per ``(label, values)``, saved as a PNG at ``path``; returns the path.

    Drawn on matplotlib's Agg canvas (no display, no pyplot state), imported here so that matplotlib is
    only needed when a plot is made. Non-finite values are left out and counted in the panel's title;
    panels whose label ends with ``grad`` are orange, the others blue.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(panels), 1)
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    height = 2.4 * rows + 0.6
    fig = Figure(figsize=(3.6 * cols, height), dpi=72)
    FigureCanvasAgg(fig)
    # fixed margins (tight_layout costs as much as the drawing); one filled step patch per panel
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.4 / height, top=1 - 0.7 / height, hspace=0.75, wspace=0.3)
    for k, (label, values) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        v = values.detach().float().cpu()
        finite = v[torch.isfinite(v)]
        bad = v.numel() - finite.numel()
        if finite.numel():
            counts, edges = torch.histogram(finite, bins=bins)
            ax.stairs(counts.numpy(), edges.numpy(), fill=True, color="C1" if label.endswith("grad") else "C0")
            mean, std = float(finite.mean()), float(finite.std(correction=0))
            label = f"{label}\nmean {mean:.3g}, std {std:.3g}"
        ax.set_title(label + (f", {bad} non-finite" if bad else ""), fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


HISTOGRAMS = ("auto", "tensorboard", "png", "both", "none")
SCALAR_STATS = ("act_mean", "act_std", "act_zero_frac", "dead_frac", "grad_norm", "weight_norm")


def check_output(dirpath: Any, filename: Any) -> None:
    """``ValueError`` unless ``dirpath`` is ``None`` or a path and ``filename`` ends with ``.csv``."""
    if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
        raise ValueError(f"dirpath must be None or a folder path, got {dirpath!r}")
    if not (isinstance(filename, str) and filename.endswith(".csv")):
        raise ValueError(f"filename must end with .csv, got {filename!r}")


def histogram_targets(histograms: str, has_tensorboard: bool) -> tuple[bool, bool]:
    """``(to_tensorboard, to_png)`` for a ``histograms`` choice; "auto" prefers TensorBoard when it is there.

    Example:
        >>> histogram_targets("auto", False), histogram_targets("both", True)
        ((False, True), (True, True))
    """
    if histograms == "tensorboard" and not has_tensorboard:
        raise ValueError("LayerStats histograms='tensorboard' needs a TensorBoardLogger among the Trainer's loggers")
    to_png = histograms in ("png", "both") or (histograms == "auto" and not has_tensorboard)
    return has_tensorboard and histograms in ("auto", "tensorboard", "both"), to_png


def scalar_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``layer_stats/<stat>/<layer>`` for every statistic a row holds (``None``: not measured)."""
    return {
        f"layer_stats/{key}/{row['layer']}": float(row[key])
        for row in rows
        for key in SCALAR_STATS
        if row[key] is not None
    }


def histogram_panels(result: LayerMeasurement) -> list[tuple[str, Tensor]]:
    """``("<layer> act" | "<layer> grad", values)`` per layer, in row order, for :func:`plot_histograms`."""
    panels = []
    for row in result.rows:
        name = row["layer"]
        for kind, values in (("act", result.activations.get(name)), ("grad", result.gradients.get(name))):
            if values is not None:
                panels.append((f"{name} {kind}", values))
    return panels
