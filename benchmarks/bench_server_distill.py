"""Server-side ensemble distillation (genfl_server/distill.py, --server-distill): its cost per round
by the number of teachers K and steps, and how far it moves a skewed student towards its teachers.

The teachers stand for K skewed clients: ExquisiteNetV1 from the run's seeded start, each trained on
real MNIST images of its own few classes (Adam 1e-3, one epoch); the student, the skewed aggregate,
on class 0 alone. Real unlabelled MNIST train images stand in for the synthetic inputs. Prints, per
(K, steps): seconds, KL and top-1 agreement with the ensemble before and after, and the memory the
kept teachers cost (K x the model's size). Run with --threads 1 on a shared machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from _common import DEFAULT_DATA_ROOT, machine_line
from genfl_server.distill import distill_classifier
from genfl_shared.codec import state_dict_nbytes
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.training import train_classifier

CPU = torch.device("cpu")


def trained(images, labels, seed: int, optimizer: str, lr: float) -> dict:
    model = model_from_state("classifier", initial_state("classifier", seed), CPU)
    train_classifier(model, to_float_images(images), labels, epochs=1, batch_size=32, optimizer=optimizer, lr=lr,
                     momentum=0.5, seed=seed, device=CPU)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--teachers", default="2,5,10", help="K values, comma-separated")
    parser.add_argument("--steps", default="50,100")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=2000, help="unlabelled images distilled on")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), f"torch threads {args.threads}")
    images, labels = load_dataset("mnist", args.data_root, "train")
    inputs = to_float_images(images[40000:40000 + args.inputs])
    only = torch.nonzero(labels == 0).flatten()[:300]
    student = trained(images[only], labels[only], seed=0, optimizer="sgd", lr=0.01)
    model_bytes = state_dict_nbytes(student)
    for k in map(int, args.teachers.split(",")):
        teachers = []
        for i in range(k):
            classes = torch.tensor([(i + j) % 10 for j in range(max(1, 10 // k))])
            idx = torch.nonzero(torch.isin(labels, classes)).flatten()[:600]
            teachers.append(trained(images[idx], labels[idx], seed=10 + i, optimizer="adam", lr=1e-3))
        for steps in map(int, args.steps.split(",")):
            _, info = distill_classifier(student, teachers, inputs, steps=steps, lr=1e-3, batch_size=args.batch_size,
                                         temperature=1.0, seed=0, device=CPU)
            print(f"K {k:2d} steps {steps:4d}: {info['seconds']:6.1f} s ({1000 * info['seconds'] / steps:.0f} ms/step), "
                  f"KL {info['kl_before']:.3f} -> {info['kl_after']:.3f}, agreement {info['agreement_before']:.3f} -> "
                  f"{info['agreement_after']:.3f}; teachers kept: {k * model_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
