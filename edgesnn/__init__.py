"""edgesnn: data-free conversion of pretrained PyTorch classifiers into private,
one-timestep spiking neural networks for edge hardware.

Stages (one module each): load → capture → synth → convert → eval; the
pipeline (``edgesnn.pipeline``) runs them and writes the artifacts.
"""

__version__ = "0.1.0"
