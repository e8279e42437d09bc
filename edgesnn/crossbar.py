"""Memristive crossbar simulation of a spiking model: mapping, non-idealities, Monte Carlo accuracy.

Mapping. Each conv/linear layer is cut into tiles of S×S cells (S = 64, 128
or 256). Rows take whole kernels: ⌊S/(k_h·k_w)⌋ input channels per tile (a
linear layer is a 1×1 conv on its flattened input). Each weight is a
differential pair of cells on adjacent columns, with conductances in units of
G_on and g_off = 1/(on/off ratio):

    G⁺ = g_off + (1 − g_off)·max(w, 0)/w_max,   G⁻ = g_off + (1 − g_off)·max(−w, 0)/w_max,
    w = w_max·(G⁺ − G⁻)/(1 − g_off),

w_max = max |w| of the output channel (a digital gain per column pair). Binary
layers use 1-bit cells (every cell at G_on or g_off: exactly two states);
int8 and float layers multi-level cells holding the deployed value.

Non-idealities, drawn per cell and per trial:

- device-to-device variation: G ← G·exp(σ·n), n ~ N(0, 1) (lognormal);
- stuck-at faults: a share p of the cells stuck, ``stuck_on_share`` of them at
  G_on, the rest at g_off (finite on/off ratio: an OFF cell still conducts);
- IR drop (first order, position dependent): G ← G·(1 − β·(r + c)/(2(S − 1)))
  for a cell r rows from the driver and c columns from the sense amplifier,
  β the loss at the far corner;
- read noise, fresh at every read: each cell reads G·(1 + σ_r·n); the column
  sum of a read is then Gaussian with variance σ_r²·Σ_i x_i²·(G⁺_i² + G⁻_i²)
  (in weight units), added to each tile's column output. Without ADCs the
  tiles' outputs are summed in the analog domain, and so are their independent
  noises: one Gaussian per output with the layer's summed variance;
- ADC: each tile's column-pair output is digitised with b bits (signed,
  2^(b−1) − 1 levels each side) over ± the largest ideal partial sum of that
  column on the first batch of images (a calibrated gain per column), before
  the tiles are summed digitally and the bias is added.

Every timestep reads the crossbars again: at T > 1 read noise is drawn per
step, while device variation and faults are the same devices at every step,
so their error is not averaged away.

The simulation is vectorised over trials: trial k's values sit in channels
[k·C, (k+1)·C) of one tensor and each conv runs as one grouped convolution
over all trials, a few images at a time so that the per-trial tensors stay in
cache. With ADCs the step is folded into each tile's weights, so the conv
yields the partial sums in ADC steps. Read noise, ADC, the sum over tiles, the
bias and (at T = 1) the next IF neurons then run in one pass per tile
(``crossbar_readout``: a small C kernel, torch operations without a compiler),
with the noise from a counter-based generator: seeded, and independent of the
thread count. The read-noise variance is computed in bfloat16 (it only sets
the noise's σ: an error of ≲ 0.2% of σ); for spikes x ∈ {0, a}, x² = a·x, so
its conv reads the spikes themselves. With every non-ideality zero the weights
are the model's own and the computation is the ideal simulator's, bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from .artifacts import Progress, SpikingModel, no_progress
from .convert import IFNeuron
from .crossbar_readout import mix64, readout
from .errors import EdgeSNNError
from torch.nn.modules.utils import _pair

from .graph import GraphNetwork, Node, _broadcast_time, module_key

TILE_SIZES = (64, 128, 256)
SAMPLES_PER_CALL = 200  # images × trials × T per simulation call: small enough to stay in cache
CALIBRATION_SAMPLES = 512  # images × T the ADC ranges are calibrated on
MIN_ADC_STEP = 1e-15  # ADC step of a column whose calibrated range is 0 (it reads ≈ 0)
VARIANCE_DTYPE = torch.bfloat16  # the read-noise variance's conv: it sets σ of the noise only (error ≲ 0.2% of σ)


class CrossbarError(EdgeSNNError):
    """The crossbar simulation was given an impossible configuration."""

    stage = "crossbar"


@dataclass(frozen=True)
class CrossbarConfig:
    """Crossbar size, device non-idealities and Monte Carlo settings; zeros mean ideal."""

    tile_size: int = 128  # rows = columns of one crossbar tile: 64, 128 or 256
    variation: float = 0.0  # σ of lognormal device-to-device variation of every conductance
    faults: float = 0.0  # share of cells stuck at ON or OFF
    stuck_on_share: float = 0.5  # share of the stuck cells stuck at G_on (the rest at g_off)
    read_noise: float = 0.0  # σ of each cell's read-to-read noise, relative to its conductance
    adc_bits: int | None = None  # ADC resolution per column (≥ 2); None: ideal readout
    on_off_ratio: float = 100.0  # G_on / G_off; math.inf: OFF cells do not conduct
    ir_drop: float = 0.0  # conductance lost at a tile's far corner (first-order IR drop), in [0, 1)
    trials: int = 100  # Monte Carlo trials (device instances)
    seed: int = 0  # seeds every draw: same seed, same devices, same result
    timesteps: int | None = None  # T of the simulation; None: the model's own

    @property
    def weights_exact(self) -> bool:
        """True when the programmed weights equal the model's (no variation, faults or IR drop)."""
        return self.variation == 0 and self.faults == 0 and self.ir_drop == 0

    @property
    def ideal(self) -> bool:
        return self.weights_exact and self.read_noise == 0 and self.adc_bits is None


@dataclass(frozen=True)
class SweepConfig:
    """Values swept one at a time from the base configuration, and the trials per point."""

    variation: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
    faults: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1)
    adc_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    trials: int = 20  # trials per point


def check_config(config: CrossbarConfig) -> None:
    if config.tile_size not in TILE_SIZES:
        raise CrossbarError(f"tile size {config.tile_size}: expected one of {', '.join(map(str, TILE_SIZES))}")
    for name in ("variation", "read_noise"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise CrossbarError(f"{name} {value} must be a finite number ≥ 0")
    if not 0 <= config.faults <= 1 or not 0 <= config.stuck_on_share <= 1:
        raise CrossbarError(f"fault rate {config.faults} and stuck-on share {config.stuck_on_share} must be in [0, 1]")
    if config.adc_bits is not None and not 2 <= config.adc_bits <= 16:
        raise CrossbarError(f"ADC bits {config.adc_bits} must be between 2 and 16")
    if not config.on_off_ratio > 1:
        raise CrossbarError(f"on/off ratio {config.on_off_ratio} must be > 1")
    if not 0 <= config.ir_drop < 1:
        raise CrossbarError(f"IR drop {config.ir_drop} must be in [0, 1)")
    if config.trials < 1:
        raise CrossbarError(f"trials {config.trials} must be ≥ 1")
    if config.timesteps is not None and config.timesteps < 1:
        raise CrossbarError(f"timesteps {config.timesteps} must be ≥ 1")


# ---------------------------------------------------------------------------
# Mapping and programmed weights


@dataclass
class MappedLayer:
    """One conv/linear layer on crossbar tiles, with the weights every trial programmed."""

    node: Node
    weight: torch.Tensor  # O × C × k_h × k_w (a linear layer: O × F × 1 × 1)
    channels_per_tile: int  # input channels whose kernels fill one tile's rows
    row_tiles: int  # tiles stacked along the inputs (their outputs are summed digitally)
    column_tiles: int  # tiles side by side along the outputs (two columns per output channel)
    cell_levels: int  # programmable conductance levels per cell: 2 (binary), 128 (int8), 0 (analog)
    programmed: torch.Tensor | None = None  # trials × O × C × k_h × k_w, or O × C × k_h × k_w when shared by all trials
    squared: torch.Tensor | None = None  # like ``programmed``: (w_max/(1−g_off))²·(G⁺² + G⁻²), for read noise
    ranges: list[torch.Tensor] = field(default_factory=list)  # per row tile: ADC full scale per output channel

    @property
    def per_trial(self) -> bool:
        return self.programmed is not None and self.programmed.dim() == 5

    @property
    def tiles(self) -> int:
        return self.row_tiles * self.column_tiles

    def tile_slices(self) -> list[slice]:
        channels = self.weight.shape[1]
        return [slice(start, min(channels, start + self.channels_per_tile)) for start in range(0, channels, self.channels_per_tile)]


def map_layers(model: SpikingModel, tile_size: int) -> list[MappedLayer]:
    """Each conv/linear of the model on tiles of ``tile_size`` (kernel-aligned rows, differential columns)."""
    layers = []
    for node in model.graph.weighted():
        weight = node.params["weight"].detach()
        if node.op == "linear":
            weight = weight.reshape(*weight.shape, 1, 1)
        elif node.attrs.get("groups", 1) != 1:
            raise CrossbarError(f"node {node.name!r}: grouped convolutions (groups={node.attrs['groups']}) cannot be mapped onto crossbar tiles")
        kernel = weight.shape[2] * weight.shape[3]
        if kernel > tile_size:
            raise CrossbarError(f"node {node.name!r}: a {kernel}-element kernel does not fit a {tile_size}-row tile")
        per_tile = tile_size // kernel
        formats = node.attrs.get("weight_format", "float")
        layers.append(
            MappedLayer(
                node,
                weight,
                per_tile,
                -(-weight.shape[1] // per_tile),
                -(-2 * weight.shape[0] // tile_size),
                {"binary": 2, "int8": 128, "mixed": 128}.get(formats, 0),  # a mixed layer's binary channels: ±the top level
            )
        )
    return layers


def _ir_attenuation(layer: MappedLayer, tile_size: int, drop: float) -> torch.Tensor:
    """Per-weight factor 1 − β·(r + c)/(2(S − 1)) from its row r and column c inside its tile."""
    out_channels, channels, height, width = layer.weight.shape
    kernel = height * width
    row = (torch.arange(channels) % layer.channels_per_tile).reshape(1, -1, 1, 1) * kernel + torch.arange(kernel).reshape(1, 1, height, width)
    column = ((2 * torch.arange(out_channels)) % tile_size).reshape(-1, 1, 1, 1)
    return 1 - drop * (row + column).float() / (2 * (tile_size - 1))


def program(layers: list[MappedLayer], config: CrossbarConfig) -> None:
    """Draw every trial's devices and store the weights they realise (in place on ``layers``).

    Each layer draws variation and faults from their own generators seeded by
    (seed, layer index), so a layer's devices do not depend on the other settings: a
    sweep over σ scales the same draws, and T=1 and T>1 meet the same devices.
    """
    g_off = 0.0 if math.isinf(config.on_off_ratio) else 1.0 / config.on_off_ratio
    for index, layer in enumerate(layers):
        layer.programmed, layer.squared = None, None
        if config.weights_exact and config.read_noise == 0:
            continue
        weight = layer.weight
        scale = weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
        positive = g_off + (1 - g_off) * weight.clamp_min(0) / scale
        negative = g_off + (1 - g_off) * (-weight).clamp_min(0) / scale
        shape = (config.trials, *weight.shape)
        if config.weights_exact:
            positive, negative = positive.unsqueeze(0), negative.unsqueeze(0)
        else:
            if config.variation > 0:
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 2 * index)
                positive = positive * torch.exp(config.variation * torch.randn(shape, generator=generator))
                negative = negative * torch.exp(config.variation * torch.randn(shape, generator=generator))
            if config.faults > 0:
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 2 * index + 1)
                uniform = [torch.rand(shape, generator=generator) for _ in range(2)]
                on_share = config.faults * config.stuck_on_share
                positive = torch.where(uniform[0] < on_share, 1.0, torch.where(uniform[0] < config.faults, g_off, positive))
                negative = torch.where(uniform[1] < on_share, 1.0, torch.where(uniform[1] < config.faults, g_off, negative))
            if config.ir_drop > 0:
                attenuation = _ir_attenuation(layer, config.tile_size, config.ir_drop)
                positive, negative = positive * attenuation, negative * attenuation
            if positive.dim() == weight.dim():
                positive, negative = positive.unsqueeze(0), negative.unsqueeze(0)
        gain = scale / (1 - g_off)
        if not config.weights_exact:
            layer.programmed = gain * (positive - negative)
            if config.variation == 0 and config.faults == 0:
                layer.programmed = layer.programmed[0]  # IR drop alone is the same in every trial
        if config.read_noise > 0:
            squared = gain**2 * (positive.square() + negative.square())
            layer.squared = squared[0] if squared.shape[0] == 1 or (config.variation == 0 and config.faults == 0) else squared


# ---------------------------------------------------------------------------
# Simulation


class _Value:
    """A tensor of the simulation: shared by all trials (N × C × …) or per trial (N × trials·C × …).

    ``amplitude``: for spikes, the C spike amplitudes a (every value is 0 or its channel's a,
    so x² = a·x); None for other values.
    """

    __slots__ = ("tensor", "per_trial", "amplitude")

    def __init__(self, tensor: torch.Tensor, per_trial: bool, amplitude: torch.Tensor | None = None):
        self.tensor, self.per_trial, self.amplitude = tensor, per_trial, amplitude


def _expand_trials(tensor: torch.Tensor, trials: int) -> torch.Tensor:
    """Shared N × C × … → per trial N × trials·C × …."""
    return tensor.unsqueeze(1).expand(tensor.shape[0], trials, *tensor.shape[1:]).reshape(tensor.shape[0], trials * tensor.shape[1], *tensor.shape[2:])


def _trials_to_batch(tensor: torch.Tensor, trials: int) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0] * trials, tensor.shape[1] // trials, *tensor.shape[2:])


def _batch_to_trials(tensor: torch.Tensor, trials: int) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0] // trials, trials * tensor.shape[1], *tensor.shape[2:])


class _ReadNoise:
    """The read-noise stream: counter-based normals under a key from the seed (``crossbar_readout``).

    Each readout takes the next block of indices, so the draws depend on the seed and the order
    of the readouts only, not on the thread count.
    """

    def __init__(self, seed: int):
        self.key = mix64(seed)
        self.counter = 0

    def take(self, count: int) -> int:
        """The first of ``count`` fresh indices."""
        first = self.counter
        self.counter += count
        return first


def _reference_modules(model: SpikingModel) -> dict[str, torch.nn.Module]:
    """The module of every node that has one (``GraphNetwork``'s), by node name: the ideal layers and the other ops."""
    reference = GraphNetwork(model.graph)
    return {node.name: reference.layer(node.name) for node in model.graph.nodes if module_key(node.name) in reference.layers}


class _Shared:
    """What every Monte Carlo run of one model on the same images shares, built once: the
    modules of its ideal layers (read only) and the ideal model's predictions at each T
    (computed by the first run that needs them; the later runs would compute the same)."""

    def __init__(self, model: SpikingModel):
        self.modules = _reference_modules(model)
        self.ideal: dict[tuple[int, int], torch.Tensor] = {}  # (T, tile size) -> N predictions


class _Simulator:
    """Runs a spiking model on crossbars for a slice of trials."""

    def __init__(self, model: SpikingModel, layers: list[MappedLayer], config: CrossbarConfig, timesteps: int, trials: slice, noise: _ReadNoise, modules: dict[str, torch.nn.Module] | None = None):
        self.model = model
        self.graph = model.graph
        self.layers = {layer.node.name: layer for layer in layers}
        self.config = config
        self.steps = timesteps
        self.trial_slice = trials
        self.trials = trials.stop - trials.start
        self.noise = noise
        self.calibrating = False
        self.modules = _reference_modules(model) if modules is None else modules
        self.neurons: dict[tuple[str, bool], IFNeuron] = {}
        self.owned = False
        self.tile_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}

    def _neuron(self, name: str, per_trial: bool) -> IFNeuron:
        key = (name, per_trial)
        if key not in self.neurons:
            self.neurons[key] = IFNeuron(self.model.thresholds[name], self.model.initial_membrane, self.model.amplitudes.get(name))
        return self.neurons[key]

    def _thresholds(self, name: str, channels: int) -> torch.Tensor:
        """θ of each of a neuron layer's ``channels``, as ``_fire`` lays them out."""
        theta = self.model.thresholds[name]
        return theta.repeat(channels // theta.numel()) if theta.dim() == 1 else theta.expand(channels)

    def _amplitudes(self, name: str, channels: int) -> torch.Tensor:
        """The spike amplitude of each of a neuron layer's ``channels`` (θ unless the model sets one)."""
        amplitude = self.model.amplitudes.get(name)
        amplitude = self.model.thresholds[name] if amplitude is None else amplitude.reshape(())
        return amplitude.float().expand(channels) if amplitude.dim() == 0 else amplitude.float().reshape(-1).repeat(channels // amplitude.numel())

    def _fire(self, name: str, current: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """IF neurons of every trial: v ← v + I, s = [v ≥ θ], v ← v − θ·s from v(0) = v₀·θ, as
        ``convert.IFNeuron`` but with fewer passes over the (large) per-trial tensor. ``owned``:
        no other node reads ``current``, so at T = 1 the spikes overwrite it."""
        theta = self.model.thresholds[name]
        channels = current.shape[1]
        theta_full = theta.repeat(channels // theta.numel()) if theta.dim() == 1 else theta.expand(channels)
        shape = (1, -1, *([1] * (current.dim() - 2)))
        theta_full = theta_full.reshape(shape)
        amplitude = self.model.amplitudes.get(name)
        amplitude = theta_full if amplitude is None else amplitude.reshape(())
        v0 = self.model.initial_membrane
        if self.steps == 1:
            if owned:
                return current.ge_(theta_full * (1 - v0)).mul_(amplitude)  # the same values, no new tensor
            return (current >= theta_full * (1 - v0)).to(current.dtype).mul_(amplitude)
        constant = current.shape[0] == self.batch
        if not constant:
            current = current.reshape(self.steps, -1, *current.shape[1:])
        membrane = (current if constant else current[0]) * 0 + theta_full * v0
        outputs = []
        for step in range(self.steps):
            membrane.add_(current if constant else current[step])
            spikes = (membrane >= theta_full).to(membrane.dtype)
            membrane.sub_(spikes * theta_full)
            outputs.append(spikes.mul_(amplitude))
        return torch.stack(outputs).reshape(-1, *outputs[0].shape[1:])

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Logits averaged over T steps: B × trials × classes."""
        batch = images.shape[0]
        self.batch = batch
        values: dict[str, _Value] = {}
        last_use, readers = {}, {}
        producers = {node.name: node.op for node in self.graph.nodes}
        for index, node in enumerate(self.graph.nodes):
            for name in node.inputs:
                last_use[name] = index
                readers[name] = readers.get(name, 0) + 1
        # A layer read by its IF neurons alone fires them in its readout (T = 1): one pass less.
        self.fire_into = {}
        if self.steps == 1 and not self.calibrating:
            for node in self.graph.nodes:
                source = node.inputs[0] if node.op == "relu" and len(node.inputs) == 1 else None
                if source in self.layers and readers[source] == 1 and source != self.graph.output:
                    self.fire_into[source] = node.name
        self.fired: set[str] = set()
        for index, node in enumerate(self.graph.nodes):
            # A tensor this simulator computed (a layer's or an add's output) read by this node alone
            source = node.inputs[0] if len(node.inputs) == 1 else None
            self.owned = source is not None and readers[source] == 1 and source != self.graph.output and (source in self.layers or producers[source] == "add")
            values[node.name] = self._node(node, values, images)
            for name in set(node.inputs):
                if last_use[name] == index and name != self.graph.output:
                    del values[name]
        output = values[self.graph.output]
        tensor = output.tensor
        if tensor.shape[0] == batch and self.steps > 1:
            tensor = tensor.unsqueeze(0).expand(self.steps, *tensor.shape)
        tensor = tensor.reshape(self.steps, batch, *tensor.shape[1:])
        counts = torch.arange(1, self.steps + 1, dtype=tensor.dtype).reshape(-1, *([1] * (tensor.dim() - 1)))
        logits = (tensor.cumsum(0) / counts)[-1]  # the ideal simulator's running average, last step
        if output.per_trial:
            return logits.reshape(batch, self.trials, -1)
        return logits.unsqueeze(1).expand(batch, self.trials, logits.shape[-1])

    def _node(self, node: Node, values: dict[str, _Value], images: torch.Tensor) -> _Value:
        if node.op == "input":
            return _Value(images, False)
        inputs = [values[name] for name in node.inputs]
        if node.op in ("add", "cat"):
            per_trial = any(v.per_trial for v in inputs)
            if per_trial and node.op == "cat":
                tensors = _broadcast_time([_trials_to_batch(v.tensor if v.per_trial else _expand_trials(v.tensor, self.trials), self.trials) for v in inputs])
                return _Value(_batch_to_trials(torch.cat(tensors, dim=node.attrs["dim"]), self.trials), True)
            tensors = _broadcast_time([v.tensor if v.per_trial or not per_trial else _expand_trials(v.tensor, self.trials) for v in inputs])
            if node.op == "add":
                return _Value(tensors[0] + tensors[1], per_trial)
            return _Value(torch.cat(tensors, dim=node.attrs["dim"]), per_trial)
        value = inputs[0]
        if node.op == "relu":
            if node.inputs[0] in self.fired:
                return value  # already fired in the layer's readout
            amplitude = self._amplitudes(node.name, value.tensor.shape[1] // (self.trials if value.per_trial else 1))
            if value.per_trial:
                return _Value(self._fire(node.name, value.tensor, self.owned), True, amplitude)
            neuron = self._neuron(node.name, False)
            neuron.timesteps, neuron.batch = self.steps, self.batch
            return _Value(neuron(value.tensor), False, amplitude)
        if node.name in self.layers:
            return self._weighted(self.layers[node.name], value)
        module = self.modules[node.name]
        if value.per_trial and node.op in ("reshape", "pad", "slice", "batchnorm"):
            return _Value(_batch_to_trials(module(_trials_to_batch(value.tensor, self.trials)), self.trials), True)
        return _Value(module(value.tensor), value.per_trial)

    # -- conv / linear --------------------------------------------------------

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, node: Node, x_per_trial: bool, w_per_trial: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
        """One conv over every trial: returns N × trials·O × … when either side varies per trial."""
        stride, padding, dilation = (1, 0, 1) if node.op == "linear" else (node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"])
        if (x_per_trial or w_per_trial) and x.shape[-1] * x.shape[-2] > 1:
            x = x.contiguous(memory_format=torch.channels_last)  # grouped convs run ~1.5× faster channels-last on CPU
        if w_per_trial and not x_per_trial and node.op == "conv" and not isinstance(padding, str):
            # One GEMM on the shared input's patches; its N·H·W × trials·O result is channels-last.
            flat = weight.reshape(-1, weight.shape[2] * weight.shape[3] * weight.shape[4])
            patches = F.unfold(x, weight.shape[3:], dilation, padding, stride)  # N × C·k_h·k_w × H'·W'
            height = (x.shape[2] + 2 * _pair(padding)[0] - _pair(dilation)[0] * (weight.shape[3] - 1) - 1) // _pair(stride)[0] + 1
            out = patches.transpose(1, 2) @ flat.t()
            if bias is not None:
                out += bias.repeat(self.trials)
            return out.reshape(x.shape[0], height, -1, out.shape[-1]).permute(0, 3, 1, 2)
        if w_per_trial:
            flat = weight.reshape(-1, *weight.shape[2:])
            return F.conv2d(x, flat, None if bias is None else bias.repeat(self.trials), stride, padding, dilation, self.trials if x_per_trial else 1)
        if x_per_trial:
            return F.conv2d(x, weight.repeat(self.trials, 1, 1, 1), None if bias is None else bias.repeat(self.trials), stride, padding, dilation, self.trials)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    def _grouped_weights(self, weight: torch.Tensor, per_trial: bool) -> torch.Tensor:
        """trials × O × C × k_h × k_w (or O × C × k_h × k_w, shared) → trials·O × C × k_h × k_w,
        channels-last as the conv wants them (converted once here, not at every call)."""
        flat = weight.reshape(-1, *weight.shape[2:]) if per_trial else weight.repeat(self.trials, 1, 1, 1)
        return flat.contiguous(memory_format=torch.channels_last)

    def _grouped_conv(self, x: torch.Tensor, weight: torch.Tensor, node: Node) -> torch.Tensor:
        """Per-trial inputs (N × trials·C × …) through ``_grouped_weights``: N × trials·O × …."""
        stride, padding, dilation = (1, 0, 1) if node.op == "linear" else (node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"])
        if x.shape[-1] * x.shape[-2] > 1:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, None, stride, padding, dilation, self.trials)

    def _weighted(self, layer: MappedLayer, value: _Value) -> _Value:
        node, config = layer.node, self.config
        x, x_per_trial = value.tensor, value.per_trial
        bias = node.params.get("bias")
        exact = layer.programmed is None and layer.squared is None and config.adc_bits is None and not self.calibrating
        if exact:
            # The ideal layer, computed exactly as the ideal simulator does.
            module = self.modules[node.name]
            if not x_per_trial:
                return _Value(module(x), False)
            if node.op == "linear":
                out = module(x.reshape(x.shape[0], self.trials, -1))
                return _Value(out.reshape(x.shape[0], -1), True)
            return _Value(self._conv(x, layer.weight, node, True, False, bias), True)
        if node.op == "linear":
            x = x.reshape(x.shape[0], -1, 1, 1)
        if config.read_noise > 0 and self.steps > 1 and x.shape[0] == self.batch:
            x = x.unsqueeze(0).expand(self.steps, *x.shape).reshape(-1, *x.shape[1:])  # every step reads again
        weight = layer.weight if layer.programmed is None else layer.programmed
        w_per_trial = layer.programmed is not None and layer.per_trial
        if w_per_trial:
            weight = weight[self.trial_slice]
        squared = layer.squared
        s_per_trial = squared is not None and squared.dim() == 5
        if s_per_trial:
            squared = squared[self.trial_slice]
        noisy = config.read_noise > 0 and not self.calibrating
        if self.calibrating:
            total = self._calibrate(layer, x, weight, x_per_trial, w_per_trial)
            if bias is not None:
                total += bias.repeat(total.shape[1] // bias.numel()).reshape(1, -1, 1, 1)
        elif config.adc_bits is None and not noisy:
            total = self._conv(x, weight, node, x_per_trial, w_per_trial, bias)  # the programmed weights, read ideally
        else:
            neuron = self.fire_into.get(node.name) if (x_per_trial or w_per_trial or noisy) else None
            fire = None
            if neuron is not None:
                theta, amplitude = self._thresholds(neuron, layer.weight.shape[0]), self._amplitudes(neuron, layer.weight.shape[0])
                fire = (theta * (1 - self.model.initial_membrane), amplitude)
            total = self._read(layer, x, value.amplitude, weight, squared, x_per_trial, w_per_trial, s_per_trial, bias, fire)
            if fire is not None:
                self.fired.add(node.name)
                if node.op == "linear":
                    total = total.reshape(total.shape[0], -1)
                return _Value(total, True, fire[1])
        if node.op == "linear":
            total = total.reshape(total.shape[0], -1)
        return _Value(total, x_per_trial or w_per_trial or noisy)

    def _read(self, layer: MappedLayer, x: torch.Tensor, amplitude: torch.Tensor | None, weight: torch.Tensor, squared: torch.Tensor | None, x_per_trial: bool, w_per_trial: bool, s_per_trial: bool, bias: torch.Tensor | None, fire: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The layer's output through the crossbar readout (``crossbar_readout.readout``).

        With ADCs each row tile is read out on its own: the ADC step is folded into the tile's
        weights (and its square into the variance's), so the conv yields the partial sums in ADC
        steps and the readout adds the read noise, rounds, clamps, scales back and sums the tiles
        in one pass. Without ADCs the tiles' column currents are summed before any readout, and
        the sum of their independent Gaussian read noises is one Gaussian with the summed
        variance: one readout for the whole layer. For spikes (x ∈ {0, a}) x² = a·x, so the
        variance σ_r²·Σ x²·(G⁺² + G⁻²) is one more set of output channels of the same conv.
        """
        node, config = layer.node, self.config
        noisy = config.read_noise > 0
        trials = self.trials if (x_per_trial or w_per_trial or noisy) else 1
        outputs = layer.weight.shape[0]
        levels = 0 if config.adc_bits is None else 2 ** (config.adc_bits - 1) - 1
        slices = layer.tile_slices() if levels else [slice(None)]
        channels = layer.weight.shape[1]
        total = None
        for tile, part in enumerate(slices):
            xs = x if len(slices) == 1 else self._channel_tile(x, channels, part, x_per_trial)
            scaled, scaled_squared, step = self._tile_weights(layer, tile, part, weight, squared, w_per_trial, s_per_trial, levels, amplitude, x_per_trial)
            out = self._grouped_conv(xs, scaled, node) if x_per_trial else self._conv(xs, scaled, node, False, w_per_trial)
            rows = out.movedim(1, -1).reshape(-1, out.shape[1])
            shape = (out.shape[0], *out.shape[2:])
            partial = rows.reshape(rows.shape[0], -1, outputs)
            variance = None
            if noisy:
                # Spikes x = a·s are read as x̃ = ã·s in the variance's dtype (ã: a rounded; a²/ã is in its weights).
                xs_variance = self._channel_tile(x, channels, part, x_per_trial, VARIANCE_DTYPE, square=amplitude is None)
                variance = self._grouped_conv(xs_variance, scaled_squared, node) if x_per_trial else self._conv(xs_variance, scaled_squared, node, False, s_per_trial)
                variance = variance.movedim(1, -1).reshape(rows.shape[0], -1, outputs)
            if partial.shape[1] != trials:
                partial = partial.expand(-1, trials, -1)
            if variance is not None and variance.shape[1] != trials:
                variance = variance.expand(-1, trials, -1)
            counter = self.noise.take(partial.numel()) if noisy else 0
            last = tile == len(slices) - 1
            total = readout(total, partial, variance, trials, outputs, self.noise.key, counter, config.read_noise, levels, step, bias if tile == 0 else None, fire if last else None)
        return total.reshape(*shape, -1).movedim(-1, 1)

    def _calibrate(self, layer: MappedLayer, x: torch.Tensor, weight: torch.Tensor, x_per_trial: bool, w_per_trial: bool) -> torch.Tensor:
        """The ideal layer (no bias), recording each row tile's largest |partial sum| per column."""
        slices = layer.tile_slices()
        channels = layer.weight.shape[1]
        total = None
        for part in slices:
            xs = x if len(slices) == 1 else self._channel_tile(x, channels, part, x_per_trial)
            ws = weight[:, :, part] if w_per_trial else weight[:, part]
            partial = self._conv(xs, ws, layer.node, x_per_trial, w_per_trial)
            layer.ranges.append(partial.abs().amax(dim=(0, 2, 3)))
            total = partial if total is None else total + partial
        return total

    def _channel_tile(self, x: torch.Tensor, channels: int, part: slice, per_trial: bool, dtype: torch.dtype | None = None, square: bool = False) -> torch.Tensor:
        """The input channels ``part`` of every trial, copied once, channels-last; ``dtype``,
        ``square``: converted to it, squared, in the same pass."""
        if not per_trial:
            x = x[:, part]
            return (x.square() if square else x).to(dtype or x.dtype)
        batch, _, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(batch, height, width, self.trials, channels)[..., part]
        if dtype is None and not square:
            return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        out = torch.empty(rows.shape, dtype=dtype or x.dtype)
        if square:
            torch.mul(rows, rows, out=out)
        else:
            out.copy_(rows)
        return out.reshape(batch, height, width, -1).permute(0, 3, 1, 2)

    def _tile_weights(self, layer: MappedLayer, tile: int, part: slice, weight: torch.Tensor, squared: torch.Tensor | None, w_per_trial: bool, s_per_trial: bool, levels: int, amplitude: torch.Tensor | None, grouped: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A tile's weights in ADC steps (no ADC: as programmed) and the read-noise variance's in
        steps², the input's spike amplitudes folded in; ``grouped``: laid out for ``_grouped_conv``. Cached for this
        simulator's trials. Returns (weights, variance weights or None, ADC step per output or None)."""
        key = (layer.node.name, tile)
        if key not in self.tile_cache:
            shape = (-1, 1, 1, 1)
            step = (layer.ranges[tile] / levels).clamp_min(MIN_ADC_STEP) if levels else None
            scaled = weight[:, :, part] if w_per_trial else weight[:, part]
            if step is not None:
                scaled = scaled / step.reshape(shape)
            scaled_squared = None
            if squared is not None:
                scaled_squared = squared[:, :, part] if s_per_trial else squared[:, part]
                if step is not None:
                    scaled_squared = scaled_squared / step.square().reshape(shape)
                if amplitude is not None:
                    a = amplitude[part]
                    scaled_squared = scaled_squared * (a.square() / a.to(VARIANCE_DTYPE).float()).reshape(-1, 1, 1)
                scaled_squared = scaled_squared.to(VARIANCE_DTYPE)
            if grouped:
                scaled = self._grouped_weights(scaled, w_per_trial)
                scaled_squared = None if scaled_squared is None else self._grouped_weights(scaled_squared, s_per_trial)
            self.tile_cache[key] = (scaled, scaled_squared, step)
        return self.tile_cache[key]


# ---------------------------------------------------------------------------
# Monte Carlo


@dataclass(frozen=True)
class MonteCarloResult:
    """Accuracy of ``trials`` simulated crossbar instances on the same images."""

    config: dict[str, Any]  # the CrossbarConfig, as plain values
    timesteps: int  # T simulated
    images: int  # images per trial
    ideal_accuracy: float | None  # the model without non-idealities (None without labels)
    accuracy: list[float]  # per trial (empty without labels)
    agreement: list[float]  # per trial: share of images where the crossbar predicts what the ideal model does
    seconds: float  # wall time

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            tensor = torch.tensor(values, dtype=torch.float64)
            mean = float(tensor.mean())
            std = float(tensor.std()) if len(values) > 1 else 0.0
            half = 1.96 * std / math.sqrt(len(values))
            low, high = (float(q) for q in torch.quantile(tensor, torch.tensor([0.025, 0.975], dtype=torch.float64)))
            return {"mean": round(mean, 6), "std": round(std, 6), "ci95": [round(mean - half, 6), round(mean + half, 6)], "p2_5": round(low, 6), "p97_5": round(high, 6), "min": round(min(values), 6), "max": round(max(values), 6)}

        return {
            "config": self.config,
            "timesteps": self.timesteps,
            "images": self.images,
            "trials": len(self.agreement),
            "ideal_accuracy": None if self.ideal_accuracy is None else round(self.ideal_accuracy, 6),
            "accuracy": stats(self.accuracy),
            "agreement": stats(self.agreement),
            "seconds": round(self.seconds, 3),
        }


def _simulate(model: SpikingModel, layers: list[MappedLayer], config: CrossbarConfig, images: torch.Tensor, steps: int, progress: Progress, task: str, modules: dict[str, torch.nn.Module] | None = None) -> torch.Tensor:
    """Predicted class of every image in every trial: N × trials."""
    per_call = max(1, SAMPLES_PER_CALL // steps)
    trial_batch = max(1, min(config.trials, per_call // 8))
    image_batch = max(1, min(len(images), per_call // trial_batch))
    noise = _ReadNoise(config.seed * 1_000_003 + 999_983)
    predictions = torch.empty(len(images), config.trials, dtype=torch.long)
    total = -(-config.trials // trial_batch) * -(-len(images) // image_batch)
    done = 0
    with torch.no_grad():
        for first in range(0, config.trials, trial_batch):
            simulator = _Simulator(model, layers, config, steps, slice(first, min(config.trials, first + trial_batch)), noise, modules)
            for start in range(0, len(images), image_batch):
                logits = simulator.run(images[start : start + image_batch])
                predictions[start : start + image_batch, first : first + simulator.trials] = logits.argmax(-1)
                done += 1
                progress(task, done, total)
    return predictions


def _calibrate_adc(model: SpikingModel, layers: list[MappedLayer], config: CrossbarConfig, images: torch.Tensor, steps: int, modules: dict[str, torch.nn.Module] | None = None) -> None:
    """ADC full scale per tile and column: the largest |partial sum| of the ideal model on ``images``."""
    for layer in layers:
        layer.ranges = []
    ideal = replace(config, variation=0.0, faults=0.0, ir_drop=0.0, read_noise=0.0, trials=1)
    saved = [(layer.programmed, layer.squared) for layer in layers]
    for layer in layers:
        layer.programmed, layer.squared = None, None
    simulator = _Simulator(model, layers, ideal, steps, slice(0, 1), _ReadNoise(0), modules)
    simulator.calibrating = True
    with torch.no_grad():
        simulator.run(images)
    for layer, (programmed, squared) in zip(layers, saved):
        layer.programmed, layer.squared = programmed, squared


def monte_carlo(model: SpikingModel, images: torch.Tensor, labels: torch.Tensor | None, config: CrossbarConfig = CrossbarConfig(), progress: Progress = no_progress) -> MonteCarloResult:
    """Accuracy (and agreement with the ideal model) of ``config.trials`` crossbar instances."""
    return _monte_carlo(model, images, labels, config, progress, _Shared(model))


def _monte_carlo(model: SpikingModel, images: torch.Tensor, labels: torch.Tensor | None, config: CrossbarConfig, progress: Progress, shared: _Shared) -> MonteCarloResult:
    check_config(config)
    if len(images) == 0:
        raise CrossbarError("no images to simulate")
    if tuple(images.shape[1:]) != tuple(model.input_shape):
        raise CrossbarError(f"images have shape {tuple(images.shape[1:])} but the model expects {tuple(model.input_shape)}")
    started = time.perf_counter()
    steps = config.timesteps or model.timesteps
    layers = map_layers(model, config.tile_size)
    key = (steps, config.tile_size)
    if key not in shared.ideal:
        shared.ideal[key] = _simulate(model, layers, replace(CrossbarConfig(tile_size=config.tile_size), trials=1), images, steps, no_progress, "ideal", shared.modules)[:, 0]
    ideal_predictions = shared.ideal[key]
    program(layers, config)
    if config.adc_bits is not None:
        _calibrate_adc(model, layers, config, images[: max(1, min(len(images), CALIBRATION_SAMPLES // steps))], steps, shared.modules)
    predictions = _simulate(model, layers, config, images, steps, progress, "crossbar MC", shared.modules)
    agreement = (predictions == ideal_predictions.unsqueeze(1)).double().mean(0).tolist()
    accuracy: list[float] = []
    ideal_accuracy = None
    if labels is not None:
        accuracy = (predictions == labels.unsqueeze(1)).double().mean(0).tolist()
        ideal_accuracy = float((ideal_predictions == labels).double().mean())
    return MonteCarloResult(_plain(asdict(config)), steps, len(images), ideal_accuracy, accuracy, agreement, time.perf_counter() - started)


def crossbar_logits(model: SpikingModel, images: torch.Tensor, config: CrossbarConfig = CrossbarConfig()) -> torch.Tensor:
    """Logits of every trial: N × trials × classes (for checks against the ideal simulator)."""
    check_config(config)
    steps = config.timesteps or model.timesteps
    layers = map_layers(model, config.tile_size)
    program(layers, config)
    if config.adc_bits is not None:
        _calibrate_adc(model, layers, config, images, steps)
    simulator = _Simulator(model, layers, config, steps, slice(0, config.trials), _ReadNoise(config.seed * 1_000_003 + 999_983))
    with torch.no_grad():
        return simulator.run(images)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {key: (None if isinstance(value, float) and math.isinf(value) else value) for key, value in values.items()}


def mapping_summary(model: SpikingModel, tile_size: int) -> dict[str, Any]:
    """Tiles, cells and utilisation per layer on ``tile_size`` arrays."""
    layers = map_layers(model, tile_size)
    rows = []
    for layer in layers:
        cells = 2 * layer.weight.numel()
        rows.append(
            {
                "name": layer.node.name,
                "weight_format": layer.node.attrs.get("weight_format", "float"),
                "cell": "1-bit" if layer.cell_levels == 2 else ("multi-level (128 levels)" if layer.cell_levels == 128 else "analog (float weights)"),
                "rows_used": layer.weight.shape[1] * layer.weight.shape[2] * layer.weight.shape[3],
                "columns_used": 2 * layer.weight.shape[0],
                "channels_per_tile": layer.channels_per_tile,
                "row_tiles": layer.row_tiles,
                "column_tiles": layer.column_tiles,
                "tiles": layer.tiles,
                "cells": cells,
                "utilisation": round(cells / (layer.tiles * tile_size * tile_size), 4),
            }
        )
    return {"tile_size": tile_size, "layers": rows, "tiles": sum(r["tiles"] for r in rows), "cells": sum(r["cells"] for r in rows)}


# ---------------------------------------------------------------------------
# Sweeps and the T comparison


@dataclass(frozen=True)
class Robustness:
    """Everything the profile reports about crossbars."""

    document: dict[str, Any]  # mapping, Monte Carlo summary, sweeps, T comparison (plain JSON values)
    plots: dict[str, bytes]  # PNG file name -> bytes


SWEEP_AXES = {
    "variation": ("device-to-device variation (lognormal sigma)", "crossbar_variation.png"),
    "faults": ("stuck-at fault rate", "crossbar_faults.png"),
    "adc_bits": ("ADC bits per column", "crossbar_adc_bits.png"),
}


def sweep(model: SpikingModel, images: torch.Tensor, labels: torch.Tensor | None, base: CrossbarConfig, parameter: str, values: tuple, trials: int, progress: Progress = no_progress) -> list[dict[str, Any]]:
    """Monte Carlo at each value of one parameter, the others as in ``base``."""
    return _sweep(model, images, labels, base, parameter, values, trials, progress, _Shared(model))


def _sweep(model: SpikingModel, images: torch.Tensor, labels: torch.Tensor | None, base: CrossbarConfig, parameter: str, values: tuple, trials: int, progress: Progress, shared: _Shared) -> list[dict[str, Any]]:
    if parameter not in SWEEP_AXES:
        raise CrossbarError(f"sweep parameter {parameter!r} is unknown; valid: {', '.join(SWEEP_AXES)}")
    points = []
    for index, value in enumerate(values):
        result = _monte_carlo(model, images, labels, replace(base, **{parameter: value}, trials=trials), no_progress, shared)
        points.append({"value": value, **result.summary()})
        progress(f"sweep {parameter}", index + 1, len(values))
    return points


def robustness(model: SpikingModel, images: torch.Tensor, labels: torch.Tensor | None, config: CrossbarConfig, sweeps: SweepConfig | None = None, compare_timesteps: tuple[int, ...] = (), progress: Progress = no_progress, compare_variation: bool = True) -> Robustness:
    """Mapping, the configured Monte Carlo, the sweeps and the T comparison, with plots."""
    from .plot import line_chart

    check_config(config)
    metric = "accuracy" if labels is not None else "agreement"
    document: dict[str, Any] = {"mapping": mapping_summary(model, config.tile_size), "metric": metric}
    shared = _Shared(model)
    configured = _monte_carlo(model, images, labels, config, progress, shared)
    document["monte_carlo"] = configured.summary()
    plots: dict[str, bytes] = {}
    if sweeps is not None:
        document["sweeps"] = {}
        for parameter, (label, filename) in SWEEP_AXES.items():
            values = getattr(sweeps, parameter)
            if not values:
                continue
            points = _sweep(model, images, labels, config, parameter, values, sweeps.trials, progress, shared)
            document["sweeps"][parameter] = points
            series = [_series(points, metric, f"T={points[0]['timesteps']}")]
            plots[filename] = line_chart(series, f"{metric} vs {label}", label, f"{metric} (mean, 95% CI)")
    if compare_timesteps:
        rows = []
        for steps in sorted(set(compare_timesteps) | {config.timesteps or model.timesteps}):
            if steps == configured.timesteps:
                # The configured run at its own T: the same simulation, only the config names T.
                result = replace(configured, config=_plain(asdict(replace(config, timesteps=steps))))
            else:
                result = _monte_carlo(model, images, labels, replace(config, timesteps=steps), progress, shared)
            rows.append(result.summary())
        document["timesteps"] = rows
        if compare_variation and sweeps is not None and sweeps.variation:
            series = []
            for steps in sorted(set(compare_timesteps) | {config.timesteps or model.timesteps}):
                points = _sweep(model, images, labels, replace(config, timesteps=steps), "variation", sweeps.variation, sweeps.trials, no_progress, shared)
                series.append(_series(points, metric, f"T={steps}"))
                document.setdefault("timesteps_variation", {})[str(steps)] = points
            plots["crossbar_timesteps.png"] = line_chart(series, f"{metric} vs variation at each T (same devices)", SWEEP_AXES["variation"][0], f"{metric} (mean, 95% CI)")
    return Robustness(document, plots)


def _series(points: list[dict[str, Any]], metric: str, name: str) -> dict[str, Any]:
    xs, ys, lows, highs = [], [], [], []
    for point in points:
        stats = point[metric]
        if stats is None:
            continue
        xs.append(float(point["value"]))
        ys.append(stats["mean"])
        lows.append(stats["ci95"][0])
        highs.append(stats["ci95"][1])
    return {"name": name, "x": xs, "y": ys, "low": lows, "high": highs}


__all__ = ["CrossbarConfig", "SweepConfig", "CrossbarError", "MonteCarloResult", "Robustness", "monte_carlo", "crossbar_logits", "sweep", "robustness", "mapping_summary", "map_layers", "TILE_SIZES"]
