"""Train the zoo teachers on the Fashion-MNIST training set and record their test accuracy.

    python scripts/train_zoo.py [--models fmnist_resnet8,fmnist_vgg] [--epochs 20] [--seed 0]
    python scripts/train_zoo.py --models fmnist_judge --epochs 6 --lr 0.02   # the audit judge (~2 min)
    python scripts/train_zoo.py --models fmnist_vgg_wide,fmnist_vgg_wider,fmnist_vgg_widest --epochs 15
    python scripts/train_zoo.py --models fmnist_vgg_wide_robust --threads 1   # adversarial fine-tuning of fmnist_vgg_wide (ROBUST)
    python scripts/train_zoo.py --models fmnist_vgg_widest_robust_long        # the same recipe for 6 epochs (32 min on 2 slow cores)

Needs the Debian package `dataset-fashion-mnist` (or --data pointing at an IDX
folder). Writes edgesnn/zoo/<name>.pt (a plain state_dict) and updates
edgesnn/zoo/zoo.json with the measured accuracy on the 10,000 test images.
Seeded and single-process, so a rerun on the same machine gives the same weights.

The models in ROBUST are not trained from scratch: they start from another zoo
model's weights and are fine-tuned adversarially (L2 perturbations found by one
gradient step from a random start, "fast adversarial training"). A robust
teacher's input gradients point towards class features a person would
recognise, so the images DeepInversion draws from it are closer to real ones
and the data-free SNN built from it loses less (BENCHMARKS.md, sessions 17-18).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgesnn.datasets import load_labelled_images  # noqa: E402
from edgesnn.zoo import JUDGES, ZOO, ZOO_DIR  # noqa: E402

TRAINABLE = {**ZOO, **JUDGES}  # the teachers and the audit judges

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class Robust:
    """Adversarial fine-tuning of a trained zoo model."""

    base: str  # the zoo model whose trained weights it starts from
    epsilon: float  # L2 radius of the perturbations, in [0,1] pixel units (one image: 784 pixels)
    clean_share: float  # share of each batch trained on the clean images, the rest on perturbed ones
    epochs: float  # passes over the training set (a fraction ends mid-epoch)
    lr: float  # peak SGD learning rate, cosine to 0


ROBUST = {
    "fmnist_vgg_wide_robust": Robust("fmnist_vgg_wide", epsilon=0.25, clean_share=0.5, epochs=2, lr=0.01),
    "fmnist_vgg_wider_robust": Robust("fmnist_vgg_wider", epsilon=0.25, clean_share=0.5, epochs=2, lr=0.01),
    "fmnist_vgg_widest_robust": Robust("fmnist_vgg_widest", epsilon=0.25, clean_share=0.5, epochs=2, lr=0.01),  # this and _long trained with 2 threads, the others with --threads 1
    "fmnist_vgg_widest_robust_long": Robust("fmnist_vgg_widest", epsilon=0.25, clean_share=0.5, epochs=6, lr=0.01),
}


def augment(images: torch.Tensor, background: float, generator: torch.Generator) -> torch.Tensor:
    """Random 2-pixel translation, horizontal flip and random erasing (p=0.5)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (2, 2, 2, 2), value=background)
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    rows = dy[:, None, None] + torch.arange(h)[None, :, None]
    cols = dx[:, None, None] + torch.arange(w)[None, None, :]
    shifted = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=generator) < 0.5
    shifted[flip] = shifted[flip].flip(3)
    erase = torch.rand(n, generator=generator) < 0.5
    eh = torch.randint(4, 12, (n,), generator=generator)
    ew = torch.randint(4, 12, (n,), generator=generator)
    ey = (torch.rand(n, generator=generator) * (h - eh)).long()
    ex = (torch.rand(n, generator=generator) * (w - ew)).long()
    ys = torch.arange(h)[None, :, None]
    xs = torch.arange(w)[None, None, :]
    box = (ys >= ey[:, None, None]) & (ys < (ey + eh)[:, None, None]) & (xs >= ex[:, None, None]) & (xs < (ex + ew)[:, None, None])
    box &= erase[:, None, None]
    return torch.where(box[:, None], torch.full_like(shifted, background), shifted)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 1000):
            correct += (model(images[start : start + 1000]).argmax(1) == labels[start : start + 1000]).sum().item()
    return correct / len(images)


def train(name: str, data: str, epochs: int, seed: int, batch: int, lr: float, checkpoint: Path | None = None) -> dict:
    entry = TRAINABLE[name]
    torch.manual_seed(seed)
    np.random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_set = load_labelled_images(data, "train", entry.normalize)
    test_set = load_labelled_images(data, "test", entry.normalize)
    x_train, y_train = torch.from_numpy(train_set.images), torch.from_numpy(train_set.labels)
    x_test, y_test = torch.from_numpy(test_set.images), torch.from_numpy(test_set.labels)
    background = (0.0 - entry.normalize[0][0]) / entry.normalize[1][0]
    model = entry.factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // batch
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    )
    started = time.time()
    first_epoch = 0
    if checkpoint is not None and checkpoint.is_file():
        # Resume an interrupted run exactly: model, optimiser, schedule and shuffling state.
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        first_epoch = state["epoch"]
        started -= state["seconds"]
    accuracy = float("nan")
    for epoch in range(first_epoch, epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            inputs = augment(x_train[index], background, generator)
            loss = F.cross_entropy(model(inputs), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        accuracy = evaluate(model, x_test, y_test)
        if checkpoint is not None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "generator": generator.get_state(), "epoch": epoch + 1, "seconds": time.time() - started}
            torch.save(state, checkpoint)
        print(f"{name} epoch {epoch + 1}/{epochs} loss {running / steps_per_epoch:.4f} test {accuracy:.4f} ({time.time() - started:.0f}s)", flush=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, entry.weights_path)
    digest = hashlib.sha256(entry.weights_path.read_bytes()).hexdigest()
    return {
        "test_accuracy": round(accuracy, 4),
        "test_images": len(x_test),
        "epochs": epochs,
        "seed": seed,
        "batch": batch,
        "lr": lr,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
        "sha256": digest,
    }


def _l2(tensor: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm, shaped to broadcast over N×C×H×W."""
    return tensor.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]


def perturb(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, radius: float, bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Inputs moved within an L2 ball of ``radius`` to raise the loss: random start, one step of 1.25·radius, projected."""
    delta = torch.randn(inputs.shape, generator=generator)
    delta = delta / _l2(delta) * radius * torch.rand(len(inputs), 1, 1, 1, generator=generator)
    delta.requires_grad_(True)
    model.eval()  # BatchNorm statistics are not updated by the attack
    loss = F.cross_entropy(model((inputs + delta).clamp(*bounds)), labels)
    (gradient,) = torch.autograd.grad(loss, delta)
    delta = delta.detach() + 1.25 * radius * gradient / _l2(gradient)
    delta = delta * torch.clamp(radius / _l2(delta), max=1.0)
    return (inputs + delta).clamp(*bounds)


def fine_tune_robust(name: str, data: str, seed: int, batch: int) -> dict:
    """Fine-tune ROBUST[name].base adversarially; writes the weights and returns the zoo.json record."""
    recipe = ROBUST[name]
    entry, base = TRAINABLE[name], TRAINABLE[recipe.base]
    if not base.weights_path.is_file():
        sys.exit(f"error: {name} starts from {recipe.base}, whose weights {base.weights_path} are missing; train it first")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_set = load_labelled_images(data, "train", entry.normalize)
    test_set = load_labelled_images(data, "test", entry.normalize)
    x_train, y_train = torch.from_numpy(train_set.images), torch.from_numpy(train_set.labels)
    x_test, y_test = torch.from_numpy(test_set.images), torch.from_numpy(test_set.labels)
    mean, std = entry.normalize[0][0], entry.normalize[1][0]
    bounds = ((0.0 - mean) / std, (1.0 - mean) / std)  # the [0,1] pixel range, normalised
    radius = recipe.epsilon / std  # the pixel-unit radius in normalised units
    model = entry.factory()
    model.load_state_dict(torch.load(base.weights_path, weights_only=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // batch
    total = int(recipe.epochs * steps_per_epoch)
    started = time.time()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(x_train), generator=generator)
        index = order[(step % steps_per_epoch) * batch : (step % steps_per_epoch + 1) * batch]
        inputs, labels = augment(x_train[index], bounds[0], generator), y_train[index]
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        adversarial = perturb(model, inputs, labels, radius, bounds, generator)
        model.train()
        clean = int(recipe.clean_share * len(inputs))
        loss = F.cross_entropy(model(torch.cat([inputs[:clean], adversarial[clean:]])), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
            print(f"{name} step {step + 1}/{total} loss {loss.item():.4f} ({time.time() - started:.0f}s)", flush=True)
    accuracy = evaluate(model, x_test, y_test)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, entry.weights_path)
    return {
        "test_accuracy": round(accuracy, 4),
        "test_images": len(x_test),
        "fine_tuned_from": recipe.base,
        "adversarial": {"norm": "l2", "epsilon": recipe.epsilon, "clean_share": recipe.clean_share, "attack": "one step from a random start"},
        "epochs": recipe.epochs,
        "seed": seed,
        "batch": batch,
        "lr": recipe.lr,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
        "sha256": hashlib.sha256(entry.weights_path.read_bytes()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads; use 1 when several jobs share the cores")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="save per-epoch state here and resume from it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        if name not in TRAINABLE:
            sys.exit(f"error: unknown zoo model {name!r}; valid: {', '.join(TRAINABLE)}")
        if name in ROBUST:  # a fine-tuning recipe of its own: --epochs and --lr do not apply
            record = fine_tune_robust(name, args.data, args.seed, args.batch)
        else:
            checkpoint = args.checkpoint_dir / f"{name}-{args.epochs}ep-seed{args.seed}.state" if args.checkpoint_dir else None
            record = train(name, args.data, args.epochs, args.seed, args.batch, args.lr, checkpoint)
        path = ZOO_DIR / "zoo.json"
        metadata = json.loads(path.read_text()) if path.is_file() else {}
        metadata[name] = record
        path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        print(f"{name}: test accuracy {record['test_accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
