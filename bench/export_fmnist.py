"""Benchmark: the exported artifacts of each zoo model's private binary T=1 build, on the full Fashion-MNIST test set.

    .venv/bin/python bench/export_fmnist.py [--builds bench/builds] [--budget fast] [--models fmnist_resnet8,fmnist_vgg] [--limit 10000]

For each zoo model it uses the build folder BUILDS/<model> (from
`bench/private_binary_fmnist.py --keep BUILDS`, or built here with --budget
when missing), exports every target, and measures on the test set:

- agreement of the ONNX (onnxruntime), TFLite (LiteRT interpreter) and NIR
  (edgesnn's NIR interpreter) predictions with the PyTorch model (the float
  one-timestep SNN with its deployed weights), and bit-exactness of the C
  harness's int64 logits with the integer reference, image by image;
- accuracy of each;
- file sizes; the C build's text/data/bss (`size` of the compiled objects: the
  arena is bss) and the arena the exporter planned;
- latency per image: onnxruntime and LiteRT at batch 1 and 64 (1 thread), the
  C harness at batch 1 (it runs one image at a time; -O2, 1 core);
- the same figures for the fp32 teacher (BatchNorm folded) exported to ONNX
  and to TFLite, float32 and int8 (`bench/teacher_tflite.py`; int8 calibrated
  on 512 real training images: the teacher is only a baseline), so every ratio
  is measured in one run.

Prints Markdown for BENCHMARKS.md; raw figures go to bench/results/export_fmnist.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from edgesnn.datasets import load_labelled_images
from edgesnn.export import NIR_FILE, RUNNERS, TFLITE_FILE, compile_c, deployment_model, images_from_pixels, lower, pixels_from_images, run_c_harness, run_reference
from edgesnn.export.to_c import arena_bytes, weight_bytes
from edgesnn.pipeline import build, export_to, read_model_target, read_teacher
from edgesnn.privatize import snn_logits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from private_binary_fmnist import build_config  # noqa: E402
from common import DATA  # noqa: E402

try:
    from teacher_tflite import teacher_tflite_bytes  # noqa: E402
except ImportError:  # the teacher's TFLite baseline is optional
    teacher_tflite_bytes = None


def onnx_session(data: bytes) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def onnx_latency_ms(data: bytes, images: np.ndarray, batch: int, count: int) -> float:
    """Mean milliseconds per image, ``count`` images in batches of ``batch`` (after a warm-up)."""
    session = onnx_session(data)
    name = session.get_inputs()[0].name
    session.run(None, {name: images[:batch]})
    started = time.perf_counter()
    done = 0
    while done < count:
        chunk = images[done % len(images) : done % len(images) + batch]
        session.run(None, {name: chunk})
        done += len(chunk)
    return 1000 * (time.perf_counter() - started) / done


def tflite_latency_ms(data: bytes, images: np.ndarray, batch: int, count: int) -> float:
    """Mean milliseconds per image in the LiteRT interpreter, 1 thread, ``count`` images in batches of ``batch``."""
    from edgesnn.export.to_tflite import run_tflite

    run_tflite(data, images[:batch], batch=batch)  # warm-up
    count = min(count, len(images)) // batch * batch
    started = time.perf_counter()
    run_tflite(data, images[:count], batch=batch)
    return 1000 * (time.perf_counter() - started) / count


def teacher_onnx(folder: Path) -> bytes:
    """The fp32 teacher (BatchNorm folded by the exporter's constant folding) as one ONNX file."""
    teacher = read_teacher(folder / "teacher.pt")
    example = torch.zeros(2, *teacher.input_shape)
    with torch.no_grad():
        program = torch.onnx.export(
            teacher.network, (example,), input_names=["images"], output_names=["logits"], opset_version=18, dynamo=True, external_data=False, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
        )
    return program.model_proto.SerializeToString()


def c_sizes(folder: Path, work: Path) -> dict:
    """text/data/bss of the compiled runtime + model objects (what a device links), with the harness's flags."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    objects = []
    for source in ("esnn.c", "esnn_model.c"):
        target = work / source.replace(".c", ".o")
        subprocess.run([compiler, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-c", str(folder / "c" / source), "-I", str(folder / "c"), "-o", str(target)], check=True)
        objects.append(str(target))
    output = subprocess.run(["size", "-t", *objects], capture_output=True, text=True, check=True).stdout.splitlines()
    text, data, bss = (int(v) for v in output[-1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def c_latency_us(executable: Path, pixels: torch.Tensor, repeat: int) -> float:
    result = subprocess.run([str(executable), "--repeat", str(repeat)], input=pixels.numpy().tobytes(), capture_output=True, check=True)
    return float(result.stderr.decode().split()[0])


def measure(name: str, folder: Path, pixels: torch.Tensor, labels: torch.Tensor, work: Path) -> dict:
    summary = export_to(str(folder), "all", folder)
    model, _ = read_model_target(str(folder))
    deployed = deployment_model(model)
    program = lower(model)
    images = images_from_pixels(pixels, model.normalize)
    started = time.perf_counter()
    pytorch = snn_logits(deployed, images, 1)
    pytorch_seconds = time.perf_counter() - started
    predictions = pytorch.argmax(1)
    integer = run_reference(program, pixels)
    onnx_logits = torch.from_numpy(RUNNERS["onnx"](folder, deployed, pixels))
    tflite_logits = torch.from_numpy(RUNNERS["tflite"](folder, deployed, pixels))
    nir_logits = torch.from_numpy(RUNNERS["nir"](folder, deployed, pixels))
    executable = compile_c(folder, work / f"{name}-c")
    c_logits = torch.from_numpy(run_c_harness(executable, pixels))
    onnx_data = (folder / "model.onnx").read_bytes()
    tflite_data = (folder / TFLITE_FILE).read_bytes()
    teacher_data = teacher_onnx(folder)
    array = images.numpy()
    teacher_images = array
    row = {
        "model": name,
        "final_model": summary["model"],
        "images": len(labels),
        "accuracy": {
            "pytorch": round(float((predictions == labels).float().mean()), 5),
            "integer_reference": round(float((integer.argmax(1) == labels).float().mean()), 5),
            "onnx": round(float((onnx_logits.argmax(1) == labels).float().mean()), 5),
            "c": round(float((c_logits.argmax(1) == labels).float().mean()), 5),
            "tflite": round(float((tflite_logits.argmax(1) == labels).float().mean()), 5),
            "nir": round(float((nir_logits.argmax(1) == labels).float().mean()), 5),
        },
        "onnx_agreement_with_pytorch": round(float((onnx_logits.argmax(1) == predictions).float().mean()), 5),
        "tflite_agreement_with_pytorch": round(float((tflite_logits.argmax(1) == predictions).float().mean()), 5),
        "tflite_agreement_with_integer_reference": round(float((tflite_logits.argmax(1) == integer.argmax(1)).float().mean()), 5),
        "nir_agreement_with_pytorch": round(float((nir_logits.argmax(1) == predictions).float().mean()), 5),
        "integer_agreement_with_pytorch": round(float((integer.argmax(1) == predictions).float().mean()), 5),
        "c_bit_exact_images": int((c_logits == integer).all(1).sum()),
        "bytes": {
            "onnx": len(onnx_data),
            "tflite": len(tflite_data),
            "nir": len((folder / NIR_FILE).read_bytes()),
            "teacher_onnx_fp32": len(teacher_data),
            "c_constants": weight_bytes(program),
            "c_arena": arena_bytes(program),
        },
        "c_build": c_sizes(folder, work),
        "latency_ms": {
            "onnx_batch1": round(onnx_latency_ms(onnx_data, array, 1, 1000), 4),
            "onnx_batch64": round(onnx_latency_ms(onnx_data, array, 64, 2048), 4),
            "teacher_onnx_batch1": round(onnx_latency_ms(teacher_data, teacher_images, 1, 1000), 4),
            "teacher_onnx_batch64": round(onnx_latency_ms(teacher_data, teacher_images, 64, 2048), 4),
            "tflite_batch1": round(tflite_latency_ms(tflite_data, array, 1, 1000), 4),
            "tflite_batch64": round(tflite_latency_ms(tflite_data, array, 64, 2048), 4),
            "c_batch1": round(c_latency_us(executable, pixels[:200], 10) / 1000, 4),
            "pytorch_batch1000_per_image": round(1000 * pytorch_seconds / len(labels), 4),
        },
    }
    if teacher_tflite_bytes is not None:
        row["teacher_tflite"] = teacher_tflite_rows(folder, array, predictions_of_teacher(folder, images), labels)
    return row


def predictions_of_teacher(folder: Path, images: torch.Tensor) -> torch.Tensor:
    teacher = read_teacher(folder / "teacher.pt")
    with torch.no_grad():
        return torch.cat([teacher.network(images[i : i + 1000]) for i in range(0, len(images), 1000)]).argmax(1)


def teacher_tflite_rows(folder: Path, images: np.ndarray, teacher_predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """The fp32 teacher as float32 and int8 TFLite: size, accuracy, agreement with the PyTorch teacher, LiteRT latency."""
    from edgesnn.export.to_tflite import run_tflite

    teacher = read_teacher(folder / "teacher.pt")
    train = load_labelled_images(DATA, "train", None, 512)
    calibration = images_from_pixels(pixels_from_images(torch.from_numpy(train.images), None), teacher.normalize).numpy()
    rows = {}
    for mode in ("float", "int8"):
        data = teacher_tflite_bytes(teacher, mode, calibration)
        logits = torch.from_numpy(run_tflite(data, images, batch=256))
        rows[mode] = {
            "bytes": len(data),
            "accuracy": round(float((logits.argmax(1) == labels).float().mean()), 5),
            "agreement_with_pytorch_teacher": round(float((logits.argmax(1) == teacher_predictions).float().mean()), 5),
            "ms_batch1": round(tflite_latency_ms(data, images, 1, 1000), 4),
            "ms_batch64": round(tflite_latency_ms(data, images, 64, 2048), 4),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builds", type=Path, default=Path(__file__).parent / "builds")
    parser.add_argument("--budget", default="fast", help="budget of builds made here when BUILDS/<model> is missing")
    parser.add_argument("--models", default="fmnist_resnet8,fmnist_vgg")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_fmnist.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesnn-bench-") as work:
        for name in [m for m in args.models.split(",") if m]:
            folder = args.builds / name
            if not (folder / "manifest.json").is_file():
                print(f"{name}: no build in {folder}; building with --budget {args.budget}", file=sys.stderr, flush=True)
                build(build_config(name, args.budget), folder, progress=lambda *a: None)
            test = load_labelled_images(DATA, "test", None, args.limit)
            pixels = pixels_from_images(torch.from_numpy(test.images), None)
            rows.append(measure(name, folder, pixels, torch.from_numpy(test.labels), Path(work)))
            print(json.dumps(rows[-1], indent=2), file=sys.stderr, flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "results": rows}, indent=2) + "\n")
    print("| model | final model | images | PyTorch | integer ref. | ONNX | TFLite | C | NIR | integer ref. = PyTorch | ONNX = PyTorch | TFLite = PyTorch | NIR = PyTorch | C bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        a = row["accuracy"]
        print(
            f"| {row['model']} | {row['final_model']} | {row['images']} | {100 * a['pytorch']:.2f} | {100 * a['integer_reference']:.2f} | {100 * a['onnx']:.2f} "
            f"| {100 * a['tflite']:.2f} | {100 * a['c']:.2f} | {100 * a['nir']:.2f} | {100 * row['integer_agreement_with_pytorch']:.2f}% "
            f"| {100 * row['onnx_agreement_with_pytorch']:.2f}% | {100 * row['tflite_agreement_with_pytorch']:.2f}% | {100 * row['nir_agreement_with_pytorch']:.2f}% "
            f"| {row['c_bit_exact_images']}/{row['images']} |"
        )
    print()
    print("Sizes (bytes):")
    print()
    print("| model | ONNX | TFLite (16x8) | NIR | C constants | C text / data / bss | arena | teacher ONNX fp32 | teacher TFLite fp32 | teacher TFLite int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        b, c, t = row["bytes"], row["c_build"], row.get("teacher_tflite", {})
        teacher = [f"{t[m]['bytes']:,}" if m in t else "n/a" for m in ("float", "int8")]
        print(
            f"| {row['model']} | {b['onnx']:,} | {b['tflite']:,} | {b['nir']:,} | {b['c_constants']:,} | {c['text']:,} / {c['data']:,} / {c['bss']:,} | {b['c_arena']:,} "
            f"| {b['teacher_onnx_fp32']:,} | {teacher[0]} | {teacher[1]} |"
        )
    print()
    print("Latency (ms per image, 1 thread; b = batch):")
    print()
    print("| model | SNN ONNX b=1 | b=64 | SNN TFLite b=1 | b=64 | SNN C b=1 | teacher ONNX b=1 | b=64 | teacher TFLite fp32 b=1 | b=64 | teacher TFLite int8 b=1 | b=64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        l, t = row["latency_ms"], row.get("teacher_tflite", {})
        teacher = " | ".join(f"{t[m]['ms_batch1']:.3f} | {t[m]['ms_batch64']:.3f}" if m in t else "n/a | n/a" for m in ("float", "int8"))
        print(
            f"| {row['model']} | {l['onnx_batch1']:.3f} | {l['onnx_batch64']:.3f} | {l['tflite_batch1']:.3f} | {l['tflite_batch64']:.3f} | {l['c_batch1']:.3f} "
            f"| {l['teacher_onnx_batch1']:.3f} | {l['teacher_onnx_batch64']:.3f} | {teacher} |"
        )
    if any("teacher_tflite" in row for row in rows):
        print()
        print("| model | teacher TFLite | accuracy | = PyTorch teacher |")
        print("|---|---|---|---|")
        for row in rows:
            for mode, entry in row.get("teacher_tflite", {}).items():
                print(f"| {row['model']} | {mode} | {100 * entry['accuracy']:.2f} | {100 * entry['agreement_with_pytorch_teacher']:.2f}% |")


if __name__ == "__main__":
    main()
