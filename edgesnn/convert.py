"""Stage ``convert``: turn the teacher into a rate-coded spiking network.

Every ReLU becomes an integrate-and-fire (IF) neuron with soft reset,

    v[t] = v[t−1] + I[t];   s[t] = [v[t] ≥ θ];   v[t] ← v[t] − θ·s[t];   out[t] = θ·s[t],

starting from v[0] = v₀·θ (v₀ = ½ centres the rounding error). A spike carries
the amplitude θ, so the firing rate times θ approximates the ReLU output clipped
at θ, and the ANN's weights are used unchanged: residual adds, pooling,
padding and concatenation therefore see the same scale as in the ANN. (For a
binary-spike deployment θ is folded into the next layer's weights at export.)
Thresholds are calibrated per layer or per channel from the ReLU outputs of the
teacher on the synthetic images: their maximum, or a percentile of the
positive activations (robust to outliers). The input is fed as a constant
current (direct coding); the output layer does not spike, its logits are the
time average of its input current.

Time is a tensor dimension: each layer processes all T timesteps of a batch in
one call (T·B samples), then each neuron runs its recurrence over T.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .artifacts import Progress, SpikingModel, SyntheticSet, Teacher, no_progress
from .errors import ConvertError
from .graph import Graph, GraphNetwork, Node, fold_batchnorm, module_key

THRESHOLD_MODES = ("max", "percentile")
SAMPLES_PER_BATCH = 262_144  # activations kept per layer and batch for percentile estimates
SAMPLES_PER_SIMULATION = 4096  # T·B samples per simulation call of the bias correction: bounds memory


@dataclass(frozen=True)
class ConvertConfig:
    """How thresholds are calibrated and how long the SNN runs by default."""

    timesteps: int = 32  # default T for inference
    threshold_mode: str = "percentile"  # "max" or "percentile" of the ReLU outputs
    percentile: float = 99.9  # used by mode "percentile": of the positive activations
    per_channel: bool = True  # one threshold per channel (False: one per layer)
    initial_membrane: float = 0.5  # v(0) as a fraction of θ
    calibration_images: int = 0  # synthetic images used for calibration; 0 means all
    bias_correction: bool = True  # shift biases so each layer's mean SNN output matches the ANN's at T = timesteps
    bias_correction_images: int = 256  # synthetic images used by the bias correction
    batch_size: int = 256  # calibration batch size
    seed: int = 0  # seed of the activation subsampling


class IFNeuron(nn.Module):
    """Integrate-and-fire neurons with soft reset over ``timesteps`` steps.

    Input: the current for T·B samples (time-major), or for B samples when the
    current is constant in time. Output: a·s for T·B samples, where the spike
    amplitude a is θ unless one is given.
    """

    def __init__(self, threshold: torch.Tensor, initial_membrane: float = 0.5, amplitude: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("threshold", threshold.detach().clone().float())
        self.register_buffer("amplitude", None if amplitude is None else amplitude.detach().clone().float().reshape(()))
        self.initial_membrane = initial_membrane
        self.timesteps = 1
        self.batch = 0  # B of the current simulation, set by SpikingNetwork

    def _theta(self, current: torch.Tensor) -> torch.Tensor:
        theta = self.threshold
        if theta.dim() == 1 and current.dim() > 2:
            theta = theta.reshape(-1, *([1] * (current.dim() - 2)))
        return theta

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        steps = self.timesteps
        theta = self._theta(current)
        if steps == 1:
            # One step, no reset after it: v = θ·m₀ + I and a·[v ≥ θ] in three passes instead of six, with the
            # same roundings as the loop below (θ·m₀ per channel, then one addition).
            spikes = torch.add(current, theta * self.initial_membrane) >= theta
            return torch.mul(spikes, theta if self.amplitude is None else self.amplitude).to(current.dtype)
        constant = current.shape[0] == self.batch and steps > 1
        if not constant:
            current = current.reshape(steps, -1, *current.shape[1:])
        membrane = torch.ones_like(current[0] if not constant else current) * theta * self.initial_membrane
        # The steps are written into one output tensor and the membrane is updated in place:
        # the same arithmetic as v ← v + I; s = [v ≥ θ]; v ← v − θ·s, without a new tensor per operation.
        outputs = torch.empty((steps, *membrane.shape), dtype=current.dtype, device=current.device)
        for step in range(steps):
            membrane.add_(current if constant else current[step])
            spikes = membrane >= theta
            if self.amplitude is None:
                torch.mul(spikes, theta, out=outputs[step])
                membrane.sub_(outputs[step])
            else:
                membrane.sub_(spikes * theta)
                torch.mul(spikes, self.amplitude, out=outputs[step])
        return outputs.reshape(-1, *membrane.shape[1:])


class SpikingNetwork(nn.Module):
    """Simulates a ``SpikingModel``: returns the mean output after each timestep."""

    def __init__(self, model: SpikingModel):
        super().__init__()
        self.model = model
        self.neurons = {name: IFNeuron(theta, model.initial_membrane, model.amplitudes.get(name)) for name, theta in model.thresholds.items()}
        self.network = GraphNetwork(model.graph, self.neurons).eval()

    def prepare(self, x: torch.Tensor, timesteps: int) -> None:
        """Set every neuron for a simulation of ``x`` over ``timesteps`` steps (``forward`` does it itself)."""
        for neuron in self.neurons.values():
            neuron.timesteps, neuron.batch = timesteps, x.shape[0]

    def forward(self, x: torch.Tensor, timesteps: int | None = None) -> torch.Tensor:
        """Logits averaged over the first t steps, for t = 1..T: shape T×B×classes."""
        steps = timesteps or self.model.timesteps
        batch = x.shape[0]
        self.prepare(x, steps)
        output = self.network(x)
        if output.shape[0] == batch and steps > 1:
            output = output.unsqueeze(0).expand(steps, *output.shape)
        output = output.reshape(steps, batch, *output.shape[1:])
        counts = torch.arange(1, steps + 1, dtype=output.dtype).reshape(-1, *([1] * (output.dim() - 1)))
        return output.cumsum(0) / counts


def _check(config: ConvertConfig) -> None:
    if config.threshold_mode not in THRESHOLD_MODES:
        raise ConvertError(f"threshold mode {config.threshold_mode!r} is unknown; valid: {', '.join(THRESHOLD_MODES)}")
    if not 0 < config.percentile <= 100:
        raise ConvertError(f"percentile {config.percentile} must be in (0, 100]")
    if config.timesteps < 1:
        raise ConvertError(f"timesteps {config.timesteps} must be at least 1")
    if not 0 <= config.initial_membrane < 1:
        raise ConvertError(f"initial membrane {config.initial_membrane} must be in [0, 1) of the threshold")
    if config.batch_size < 1 or config.calibration_images < 0 or config.bias_correction_images < 1:
        raise ConvertError("batch size must be ≥ 1 and calibration images ≥ 0")


class _ActivationStatistics:
    """Collects, per ReLU node, the running max and a subsample of positive outputs."""

    def __init__(self, per_channel: bool, generator: torch.Generator):
        self.per_channel = per_channel
        self.generator = generator
        self.maximum: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def observe(self, name: str, output: torch.Tensor) -> None:
        values = output.detach()
        if not self.per_channel:
            values = values.reshape(1, 1, -1)
        # Channel c's samples are values[n, c, p] (p: the flattened position), numbered n·P + p.
        rows = values.reshape(values.shape[0], values.shape[1], -1)
        count, positions = rows.shape[0] * rows.shape[2], rows.shape[2]
        maximum = rows.amax(dim=(0, 2))
        self.maximum[name] = maximum if name not in self.maximum else torch.maximum(self.maximum[name], maximum)
        keep = max(1, SAMPLES_PER_BATCH // rows.shape[1])
        if count > keep:
            index = torch.randint(0, count, (keep,), generator=self.generator)
            channels = rows[index // positions, :, index % positions].t()  # only the drawn samples are copied
        else:
            channels = rows.transpose(0, 1).reshape(rows.shape[1], -1)
        self.samples.setdefault(name, []).append(channels)

    def threshold(self, name: str, mode: str, percentile: float) -> torch.Tensor:
        if mode == "max":
            result = self.maximum[name]
        else:
            values = torch.cat(self.samples[name], dim=1)
            result = torch.stack([_positive_percentile(row, percentile) for row in values])
        return result if self.per_channel else result.reshape(())


def _positive_percentile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    positive = values[values > 0]
    if positive.numel() == 0:
        return torch.tensor(0.0)
    rank = min(positive.numel(), max(1, int(round(percentile / 100 * positive.numel()))))
    return positive.kthvalue(rank).values


def calibrate_thresholds(graph: Graph, images: torch.Tensor, config: ConvertConfig, progress: Progress = no_progress) -> dict[str, torch.Tensor]:
    """Threshold θ per ReLU node of ``graph`` from its outputs on ``images`` (ANN mode)."""
    network = GraphNetwork(graph).eval()
    statistics = _ActivationStatistics(config.per_channel, torch.Generator().manual_seed(config.seed))
    handles = []
    for node in graph.neurons():
        handles.append(network.layer(node.name).register_forward_hook(lambda module, inputs, output, name=node.name: statistics.observe(name, output)))
    try:
        with torch.no_grad():
            for start in range(0, len(images), config.batch_size):
                network(images[start : start + config.batch_size])
                progress("calibrate", min(start + config.batch_size, len(images)), len(images))
    finally:
        for handle in handles:
            handle.remove()
    thresholds = {}
    for node in graph.neurons():
        theta = statistics.threshold(node.name, config.threshold_mode, config.percentile)
        ceiling = node.attrs.get("ceiling")
        if ceiling is not None:
            theta = theta.clamp(max=ceiling)
        # A layer (or channel) that never fires on the calibration set gets a tiny
        # threshold of its layer's scale rather than 0, which would fire on noise.
        fallback = float(theta.max()) if theta.numel() > 1 and float(theta.max()) > 0 else 1.0
        thresholds[node.name] = torch.where(theta > 0, theta, torch.full_like(theta, fallback))
    return thresholds


def _bias_owner(graph: Graph, neuron: Node) -> Node | None:
    """The node whose bias sets the neuron's input current: the conv/linear feeding it, or one branch of an add."""
    source = graph[neuron.inputs[0]]
    candidates = [source] if source.op != "add" else [graph[name] for name in source.inputs]
    for candidate in candidates:
        if candidate.op in ("conv", "linear") or (candidate.op == "batchnorm" and "bias" in candidate.params):
            return candidate
    return None


def _channel_means(name: str, store: dict[str, torch.Tensor], steps: int = 1, ceiling: torch.Tensor | None = None):
    """A forward hook that accumulates per-channel sums of a layer's output (averaged over T)."""

    def hook(module, inputs, output):
        values = output.detach()
        if ceiling is not None:
            theta = ceiling.reshape(-1, *([1] * (values.dim() - 2))) if ceiling.dim() == 1 and values.dim() > 2 else ceiling
            values = torch.minimum(values, theta)
        values = values.reshape(steps, -1, *values.shape[1:]).mean(0)
        # Sum over samples of each channel's spatial mean.
        spatial = values[0, 0].numel()
        store[name] = store.get(name, 0) + values.sum(dim=[0] + list(range(2, values.dim()))) / spatial

    return hook


def correct_biases(graph: Graph, thresholds: dict[str, torch.Tensor], initial_membrane: float, images: torch.Tensor, timesteps: int, batch_size: int, progress: Progress = no_progress) -> tuple[Graph, dict[str, float]]:
    """Bias correction (Li et al., 2021), layer by layer in topological order.

    For neuron l with input-current bias b (per channel c):
    b_c ← b_c + E[min(a_c, θ)] − E[r_c·θ], where a is the ANN's ReLU output and r
    the SNN's firing rate over T steps on the same images, given the
    corrections already applied to the layers before l. The mean error that
    rate coding adds at each layer is removed instead of passed on.
    Returns the corrected graph and the mean |shift| per neuron.

    The SNN is simulated up to neuron l only. When the images fit one simulation
    call, the values of the nodes before the layer corrected last are kept from the
    previous neuron's run, so each run starts at that layer: the same operations on
    the same inputs as a whole simulation per neuron, a fraction of the work.
    """
    graph = graph.copy()
    neurons = graph.neurons()
    ann_means: dict[str, torch.Tensor] = {}
    network = GraphNetwork(graph)
    handles = [network.layer(n.name).register_forward_hook(_channel_means(n.name, ann_means, 1, thresholds[n.name])) for n in neurons]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            network(images[start : start + batch_size])
    for handle in handles:
        handle.remove()
    shifts: dict[str, float] = {}
    simulation_batch = max(1, min(batch_size, SAMPLES_PER_SIMULATION // timesteps))
    chunks = [images[start : start + simulation_batch] for start in range(0, len(images), simulation_batch)]
    simulator = SpikingNetwork(SpikingModel(graph, thresholds, initial_membrane, timesteps, (0, 0, 0), 0, None))
    position = {node.name: index for index, node in enumerate(graph.nodes)}
    readers: dict[str, list[int]] = {node.name: [] for node in graph.nodes}
    for node in graph.nodes:
        for name in node.inputs:
            readers[name].append(position[node.name])
    owners = {neuron.name: _bias_owner(graph, neuron) for neuron in neurons}
    # Run k+1 starts at the layer corrected by run k; the earliest start of this run's successors.
    restarts = [position[owners[n.name].name] if owners[n.name] is not None else len(graph.nodes) for n in neurons]
    earliest = [min(restarts[k:]) for k in range(len(neurons))]
    # With one chunk the values a later run reads stay between runs; with more, each run starts
    # from the input (keeping every chunk's values would hold them all at once).
    keep = len(chunks) == 1
    kept: dict[str, torch.Tensor] = {}
    begin = 0
    for index, neuron in enumerate(neurons):
        owner = owners[neuron.name]
        if owner is None:
            continue
        stop = position[neuron.name] + 1
        last_read = {name: max(p for p in readers[name] if p < stop) for node in graph.nodes[begin:stop] for name in node.inputs}
        retained = {node.name for node in graph.nodes[:stop] if keep and position[node.name] < restarts[index] and max(readers[node.name], default=-1) >= earliest[index]}
        snn_means: dict[str, torch.Tensor] = {}
        accumulate = _channel_means(neuron.name, snn_means, timesteps)
        with torch.no_grad():
            for chunk in chunks:
                values = kept if keep else {}
                simulator.prepare(chunk, timesteps)
                for node in graph.nodes[begin:stop]:
                    values[node.name] = simulator.network.evaluate(node, values, chunk)
                    for name in set(node.inputs):
                        if last_read[name] == position[node.name] and name not in retained:
                            del values[name]
                accumulate(None, None, values[neuron.name])
                for name in [name for name in values if name not in retained]:
                    del values[name]
        delta = (ann_means[neuron.name] - snn_means[neuron.name]) / len(images)
        reference = owner.params["weight"] if "weight" in owner.params else owner.params["bias"]
        bias = owner.params.get("bias", torch.zeros(reference.shape[0]))
        owner.params["bias"] = bias + delta
        simulator.network.rebuild(owner)
        shifts[neuron.name] = round(float(delta.abs().mean()), 6)
        progress("bias corr.", index + 1, len(neurons))
        begin = restarts[index] if keep else 0
    return graph, shifts


def convert(teacher: Teacher, synthetic: SyntheticSet, config: ConvertConfig = ConvertConfig(), progress: Progress = no_progress) -> SpikingModel:
    """Fold BatchNorm, calibrate IF thresholds on the synthetic images, return the SNN."""
    _check(config)
    images = synthetic.images
    if config.calibration_images:
        images = images[: config.calibration_images]
    if len(images) == 0:
        raise ConvertError("no calibration images: the synthetic set is empty")
    if tuple(images.shape[1:]) != tuple(teacher.input_shape):
        raise ConvertError(f"synthetic images have shape {tuple(images.shape[1:])} but the teacher expects {teacher.input_shape}")
    started = time.perf_counter()
    graph = fold_batchnorm(teacher.graph)
    thresholds = calibrate_thresholds(graph, images, config, progress)
    shifts: dict[str, float] = {}
    if config.bias_correction:
        graph, shifts = correct_biases(graph, thresholds, config.initial_membrane, images[: config.bias_correction_images], config.timesteps, config.batch_size, progress)
    metrics = {
        "calibration_images": len(images),
        "seconds": round(time.perf_counter() - started, 3),
        "neurons": len(thresholds),
        "threshold_mean": {name: round(float(theta.mean()), 5) for name, theta in thresholds.items()},
        "bias_shift_mean": shifts,
    }
    return SpikingModel(graph, thresholds, config.initial_membrane, config.timesteps, teacher.input_shape, teacher.num_classes, teacher.normalize, asdict(config), metrics)


def spiking_state(model: SpikingModel) -> dict:
    """The SNN as plain values and tensors (safe for ``torch.load(weights_only=True)``)."""
    return {
        "format": "edgesnn-spiking-model",
        "graph": model.graph.to_dict(),
        "thresholds": {name: theta.clone() for name, theta in model.thresholds.items()},
        "initial_membrane": model.initial_membrane,
        "timesteps": model.timesteps,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "normalize": [list(model.normalize[0]), list(model.normalize[1])] if model.normalize else None,
        "config": model.config,
        "metrics": model.metrics,
        "amplitudes": {name: a.clone() for name, a in model.amplitudes.items()},
    }


def spiking_from_state(state: dict, where: str = "model") -> SpikingModel:
    """Inverse of ``spiking_state``, checking what it reads."""
    from .errors import ArtifactError

    if not isinstance(state, dict) or state.get("format") != "edgesnn-spiking-model":
        raise ArtifactError(f"{where}: not an edgesnn spiking model")
    graph = Graph.from_dict(state.get("graph"), where)
    thresholds = state.get("thresholds")
    neuron_names = {node.name for node in graph.neurons()}
    if not isinstance(thresholds, dict) or set(thresholds) != neuron_names:
        raise ArtifactError(f"{where}: thresholds do not match the graph's neurons")
    for name, theta in thresholds.items():
        if not isinstance(theta, torch.Tensor) or not torch.isfinite(theta).all() or (theta <= 0).any():
            raise ArtifactError(f"{where}: threshold of {name!r} must be a finite positive tensor")
    amplitudes = state.get("amplitudes", {})
    if not isinstance(amplitudes, dict) or not set(amplitudes) <= neuron_names:
        raise ArtifactError(f"{where}: amplitudes do not match the graph's neurons")
    for name, amplitude in amplitudes.items():
        if not isinstance(amplitude, torch.Tensor) or amplitude.numel() != 1 or not torch.isfinite(amplitude).all() or float(amplitude) <= 0:
            raise ArtifactError(f"{where}: amplitude of {name!r} must be a finite positive scalar")
    try:
        normalize = state["normalize"]
        normalize = (tuple(normalize[0]), tuple(normalize[1])) if normalize else None
        return SpikingModel(
            graph,
            thresholds,
            float(state["initial_membrane"]),
            int(state["timesteps"]),
            tuple(int(v) for v in state["input_shape"]),
            int(state["num_classes"]),
            normalize,
            dict(state.get("config", {})),
            dict(state.get("metrics", {})),
            {name: a.reshape(()).float() for name, a in amplitudes.items()},
        )
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ArtifactError(f"{where}: malformed spiking model ({error})") from None


__all__ = ["ConvertConfig", "IFNeuron", "SpikingNetwork", "calibrate_thresholds", "convert", "module_key", "spiking_state", "spiking_from_state"]
