"""Benchmark: the privacy audit of the zoo models — class leakage of the ANN, the plain converted SNN and the private binary SNN.

    .venv/bin/python bench/audit_fmnist.py [--builds bench/builds] [--models fmnist_resnet8,fmnist_vgg] [--images-per-class 20] [--iterations 200] [--members 2000]

For each model with a build folder (``bench/private_binary_fmnist.py --keep``):
attack 1 (deployed weights de-scaled into the ANN architecture and inverted) on
the teacher (teacher.pt), the plain converted SNN (snn.pt) and the private
binary T=1 SNN (binary.pt); attack 2 (the SNN inverted through surrogate
gradients) on both SNNs. Attack success is the share of inverted images the
independent zoo judge (``fmnist_judge``, a LeNet trained separately on the real
training set) classifies as their class; chance is 10%. Membership inference
(loss and confidence thresholds, ROC AUC) on ``--members`` training images
against as many test images, for the binary SNN and the teacher. Writes
bench/results/audit_fmnist.json, the inverted-image grids into
bench/results/audit_fmnist/, and prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from edgesnn.audit import AuditConfig, MembershipData, audit, descaled_ann
from edgesnn.datasets import load_labelled_images
from edgesnn.artifacts import SyntheticSet
from edgesnn.pipeline import audit_inverter, load_judge, read_spiking, read_teacher
from edgesnn.synth import preview_png
from edgesnn.zoo import FASHION_MNIST_NORMALIZE

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: bench/ is on the path; imported: make it so
from common import DATA, ROOT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", type=Path, default=ROOT / "bench" / "builds")
    parser.add_argument("--models", default="fmnist_resnet8,fmnist_vgg")
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--attack-timesteps", type=int, default=4)
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit_fmnist.json")
    parser.add_argument("--membership-only", action="store_true", help="recompute only the membership figures of an existing --out (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    members = load_labelled_images(DATA, "train", FASHION_MNIST_NORMALIZE, args.members)
    non_members = load_labelled_images(DATA, "test", FASHION_MNIST_NORMALIZE, args.members)
    membership = MembershipData(*(torch.from_numpy(a) for a in (members.images, members.labels, non_members.images, non_members.labels)), f"{args.members} train / {args.members} test images of {DATA}")
    if args.membership_only:
        from edgesnn.audit import membership_inference
        from edgesnn.privatize import snn_logits

        results = json.loads(args.out.read_text())
        for name, document in results["models"].items():
            folder = args.builds / name
            teacher, deployed = read_teacher(folder / "teacher.pt"), read_spiking(folder / "binary.pt")
            teacher_network = teacher.network
            with torch.no_grad():
                document["membership"]["deployed"] = membership_inference(lambda images: snn_logits(deployed, images), membership)
                document["membership"]["ann"] = membership_inference(teacher_network, membership)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print_tables(results)
        return
    config = AuditConfig(images_per_class=args.images_per_class, iterations=args.iterations, attack_timesteps=args.attack_timesteps)
    inverter = audit_inverter(config.iterations)
    grids = args.out.parent / "audit_fmnist"
    grids.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "config": {**vars(args), "builds": str(args.builds), "out": str(args.out)},
        "models": {},
    }
    for name in args.models.split(","):
        folder = args.builds / name
        teacher = read_teacher(folder / "teacher.pt")
        deployed, converted = read_spiking(folder / "binary.pt"), read_spiking(folder / "snn.pt")
        manifest = json.loads((folder / "manifest.json").read_text())
        judge = load_judge(None, teacher)
        started = time.perf_counter()
        result = audit(deployed, inverter, teacher, converted, judge, membership, manifest, config, lambda task, done, total: None)
        seconds = time.perf_counter() - started
        document = result.document
        document["audit_seconds"] = round(seconds, 1)
        # How well the attacker's ANN (attack 1's network) classifies real test images: the weights' "ANN reading".
        with torch.no_grad():
            document["descaled_ann_accuracy"] = {
                label: round(float((network(membership.non_members).argmax(1) == membership.non_member_labels).float().mean()), 4)
                for label, network in (("deployed", descaled_ann(deployed)), ("converted", descaled_ann(converted)), ("ann", teacher.network))
            }
        results["models"][name] = document
        for inversion in result.inversions:
            grid = SyntheticSet(inversion.images, inversion.labels, torch.zeros(len(inversion.labels), 10), "audit", {})
            (grids / f"{name}-{inversion.model}-{inversion.attack}.png").write_bytes(preview_png(grid, teacher.normalize, columns=10, max_images=100))
        attacks = document["attacks"]
        print(f"{name}: judge {document['judge']}, {seconds:.0f} s", flush=True)
        for attack, entries in attacks.items():
            print("  " + attack + ": " + ", ".join(f"{model} {entry['attack_success']:.1%}" for model, entry in entries.items()), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)


def print_tables(results: dict) -> None:
    print("\n| model | attack | judge floor (untrained) | ANN | converted SNN | private binary SNN | privacy gain |")
    print("|---|---|---|---|---|---|---|")
    for name, document in results["models"].items():
        for attack, entries in document["attacks"].items():
            ann = f"{entries['ann']['attack_success']:.1%}" if "ann" in entries else "–"
            floor = f"{document['judge_floor']:.1%}" if attack == "weights" and "judge_floor" in document else "–"
            print(f"| {name} | {attack} | {floor} | {ann} | {entries['converted']['attack_success']:.1%} | {entries['deployed']['attack_success']:.1%} | {document['privacy_gain'][attack]:+.1%} |")
    print("\n| model | ANN reading of the weights: accuracy on the non-members, ANN / converted / binary |")
    print("|---|---|")
    for name, document in results["models"].items():
        a = document["descaled_ann_accuracy"]
        print(f"| {name} | {a['ann']:.1%} / {a['converted']:.1%} / {a['deployed']:.1%} |")
    print("\n| model | members / non-members | loss AUC binary SNN | confidence AUC binary SNN | loss AUC ANN | confidence AUC ANN | audit seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, document in results["models"].items():
        m = document["membership"]
        print(f"| {name} | {m['members']} / {m['non_members']} | {m['deployed']['loss_auc']:.3f} | {m['deployed']['confidence_auc']:.3f} | {m['ann']['loss_auc']:.3f} | {m['ann']['confidence_auc']:.3f} | {document['audit_seconds']:.0f} |")


if __name__ == "__main__":
    main()
