"""Server-side synthetic fine-tuning (genfl_server/finetune.py, --server-finetune-steps): how far
N class-balanced SGD steps bring a deliberately skewed classifier back on balanced data.

The skewed "aggregate": ExquisiteNetV1 from the run's seeded start, trained on real MNIST images
of one class only (what a federation of one-class clients drifts towards). It is fine-tuned on a
class-balanced labelled set (real MNIST train images stand in for the synthetic set: same
shapes, binarised like it) and scored on balanced test images. Prints balanced accuracy before
and after, per (steps, lr), for --seeds seeds: the numbers tests/test_mitigation.py's margin is
chosen from.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import DEFAULT_DATA_ROOT, machine_line
from genfl_server.finetune import finetune_classifier
from genfl_shared.data import load_dataset, to_float_images
from genfl_shared.models import initial_state, model_from_state
from genfl_shared.training import evaluate_classifier, train_classifier

CPU = torch.device("cpu")


def balanced_subset(images, labels, per_class: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                                                                            generator=generator)[:per_class]]
                        for c in range(10)])
    return to_float_images(images[chosen]), labels[chosen]


def skewed_state(images, labels, seed: int) -> dict:
    """A classifier trained on one class only (class seed % 10): it predicts that class everywhere."""
    only = labels == seed % 10
    model = model_from_state("classifier", initial_state("classifier", seed), CPU)
    train_classifier(model, to_float_images(images[only][:300]), labels[only][:300], epochs=1, batch_size=32,
                     optimizer="sgd", lr=0.01, momentum=0.5, seed=seed, device=CPU)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--steps", default="25,50,100,200")
    parser.add_argument("--lrs", default="0.01,0.05")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=100, help="fine-tuning images per class")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(machine_line())
    train_x, train_y = load_dataset("mnist", args.data_root, "train")
    test_x, test_y = load_dataset("mnist", args.data_root, "test")
    for seed in range(args.seeds):
        tune_x, tune_y = balanced_subset(train_x, train_y, args.per_class, seed)
        eval_x, eval_y = balanced_subset(test_x, test_y, 100, seed)
        skewed = skewed_state(train_x, train_y, seed)
        before = evaluate_classifier(model_from_state("classifier", skewed, CPU), eval_x, eval_y, device=CPU)
        print(f"seed {seed}: skewed model (class {seed % 10} only), balanced accuracy {100 * before['accuracy']:.1f} %")
        for lr in map(float, args.lrs.split(",")):
            for steps in map(int, args.steps.split(",")):
                started = time.perf_counter()
                tuned, _ = finetune_classifier(skewed, tune_x, tune_y, steps=steps, lr=lr,
                                               batch_size=args.batch_size, seed=seed, device=CPU)
                after = evaluate_classifier(model_from_state("classifier", tuned, CPU), eval_x, eval_y, device=CPU)
                print(f"seed {seed} lr {lr:g} steps {steps:4d}: {100 * after['accuracy']:5.1f} % "
                      f"(+{100 * (after['accuracy'] - before['accuracy']):.1f} pp, {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
