"""Every registered exporter, on a small model and on a residual model: its artifact, run by its runtime
on real Fashion-MNIST images, predicts what the PyTorch model predicts; a corrupt or unsupported model
gets a one-line error naming the layer."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from edgesnn.errors import ExportError
from edgesnn.export import EXPORTERS, RUNNERS, ExportContext, deployment_model, export_files, images_from_pixels, lower, run_reference
from edgesnn.privatize import snn_logits

needs_compiler = shutil.which("cc") is None and shutil.which("gcc") is None or shutil.which("make") is None


@pytest.fixture(scope="module")
def models(vgg_one_step, binarized, mixed):
    return {"vgg": vgg_one_step, "binary_resnet": binarized, "mixed_resnet": mixed}


@pytest.mark.parametrize("model_name", ["vgg", "binary_resnet", "mixed_resnet"])
@pytest.mark.parametrize("target", list(EXPORTERS))
def test_artifact_predicts_what_pytorch_predicts(models, pixels, tmp_path, target, model_name) -> None:
    if target == "c" and needs_compiler:
        pytest.skip("no C compiler")
    model = models[model_name]
    for path, data in export_files(ExportContext(model, "edgesnn tests"), [target]).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    sample = pixels[:200]
    found = torch.from_numpy(np.asarray(RUNNERS[target](tmp_path, model, sample)))
    expected = snn_logits(deployment_model(model), images_from_pixels(sample, model.normalize), 1).argmax(1)
    agreement = float((found.argmax(1) == expected).float().mean())
    assert agreement >= 0.99, f"{target} on {model_name}: {agreement:.3f}"
    if target in ("c", "tflite"):
        # The integer targets compute the integer reference: C bit for bit, TFLite to its predictions.
        integer = run_reference(lower(model), sample)
        if target == "c":
            assert torch.equal(found.long(), integer)
        else:
            assert torch.equal(found.argmax(1), integer.argmax(1))


@pytest.mark.parametrize("target", list(EXPORTERS))
def test_corrupt_weights_name_the_layer(models, target) -> None:
    model = models["vgg"]
    graph = model.graph.copy()
    node = graph.weighted()[1]
    node.params["weight"] = node.params["weight"].clone()
    node.params["weight"].view(-1)[3] = float("nan")
    with pytest.raises(ExportError) as caught:
        export_files(ExportContext(replace(model, graph=graph), "edgesnn tests"), [target])
    message = str(caught.value)
    assert f"node '{node.name}' (conv)" in message and "NaN" in message and "\n" not in message


@pytest.mark.parametrize("target", list(EXPORTERS))
def test_unsupported_layer_is_named(models, pixels, tmp_path, target) -> None:
    model = models["vgg"]
    graph = model.graph.copy()
    node = graph.weighted()[1]
    node.attrs = {**node.attrs, "dilation": (2, 2), "padding": (2, 2)}  # same output size; the integer targets have no dilation
    dilated = replace(model, graph=graph)
    if target in ("onnx", "nir"):
        # The float targets express dilation: their artifact must compute the dilated model.
        for path, data in export_files(ExportContext(dilated, "edgesnn tests"), [target]).items():
            (tmp_path / path).write_bytes(data)
        found = torch.from_numpy(np.asarray(RUNNERS[target](tmp_path, dilated, pixels[:50]))).argmax(1)
        expected = snn_logits(deployment_model(dilated), images_from_pixels(pixels[:50], model.normalize), 1).argmax(1)
        assert float((found == expected).float().mean()) >= 0.98
        return
    with pytest.raises(ExportError) as caught:
        export_files(ExportContext(dilated, "edgesnn tests"), [target])
    assert f"node '{node.name}'" in str(caught.value) and "dilation" in str(caught.value) and "\n" not in str(caught.value)
