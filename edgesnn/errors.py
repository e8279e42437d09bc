"""Errors that edgesnn raises for a user's mistake or a bad input.

Every message names what was wrong, where, and what was expected, on one line:
the CLI prints it as ``error: <message>`` and exits 1. Anything that is not an
``EdgeSNNError`` is a bug in edgesnn and keeps its traceback.
"""

from __future__ import annotations


class EdgeSNNError(Exception):
    """Base class: a problem with the user's input, not a bug."""

    stage = "edgesnn"

    def __str__(self) -> str:
        message = super().__str__()
        prefix = f"{self.stage}: "
        return message if message.startswith(prefix) else prefix + message


class LoadError(EdgeSNNError):
    """A checkpoint, archive or architecture could not be loaded."""

    stage = "load"


class UnsafePickleError(LoadError):
    """A checkpoint needs pickle code execution and --trust-pickle was not given."""


class CaptureError(EdgeSNNError):
    """The model's graph uses an op or pattern the converter does not support."""

    stage = "capture"


class SynthError(EdgeSNNError):
    """Synthetic image generation was given an impossible configuration."""

    stage = "synth"


class ConvertError(EdgeSNNError):
    """ANN-to-SNN conversion failed (calibration, thresholds, bad graph)."""

    stage = "convert"


class DataError(EdgeSNNError):
    """An evaluation data set is missing, truncated or malformed."""

    stage = "data"


class ArtifactError(EdgeSNNError):
    """A stage artifact on disk is missing, corrupt or of the wrong kind."""

    stage = "artifact"


class PipelineError(EdgeSNNError):
    """The build pipeline cannot run or resume as asked."""

    stage = "build"


class PrivatizeError(EdgeSNNError):
    """Temporal retraining or timestep reduction was given an impossible configuration."""

    stage = "privatize"


class BinarizeError(EdgeSNNError):
    """Adaptive binarization was given an impossible configuration."""

    stage = "binarize"


class ExportError(EdgeSNNError):
    """The model cannot be expressed in a deployment format, or an exported artifact is inconsistent."""

    stage = "export"


class BundleError(EdgeSNNError):
    """A bundle, key or signature is missing, unreadable, or cannot be sealed, verified or decrypted."""

    stage = "bundle"


class TamperedBundleError(BundleError):
    """A bundle's manifest, signature or files do not match: it was altered or damaged."""


class AuditError(EdgeSNNError):
    """A privacy audit cannot run: missing teacher, mismatched member/non-member sets, bad configuration."""

    stage = "audit"
