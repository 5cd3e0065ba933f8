"""Seconds per training step at batch 32 (the paper's batch size), eager vs CUDA-graph replay.

    python benchmarks/bench_train_step.py [--device cuda] [--samples 6000] [--epochs 2]

On CUDA it also checks that the graph path trains like the eager path (epoch losses within a few
percent: dropout masks and reparameterisation noise differ between the two, so not bit-equal).
"""

from __future__ import annotations

import time

import click
import torch

from genfl_shared.models import build_model
from genfl_shared.training import train_classifier, train_cvae


def run(kind: str, optimizer: str, images, labels, *, epochs: int, device: str, graphs: bool):
    torch.manual_seed(0)
    model = build_model(kind)
    losses = []
    started = time.perf_counter()
    if kind == "cvae":
        result = train_cvae(model, images, labels, epochs=epochs, batch_size=32, lr=1e-3, seed=1, device=device,
                            cuda_graphs=graphs, progress=lambda e, l: losses.append(l))
    else:
        result = train_classifier(model, images, labels, epochs=epochs, batch_size=32, optimizer=optimizer,
                                  lr=1e-3, momentum=0.5, seed=1, device=device, cuda_graphs=graphs,
                                  progress=lambda e, l: losses.append(l))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return seconds / result["steps"] * 1000, losses


@click.command()
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
@click.option("--samples", default=6000)
@click.option("--epochs", default=2)
def main(device, samples, epochs):
    g = torch.Generator().manual_seed(0)
    # Digit-like structure is irrelevant for speed; labels depend on the image so the loss can fall.
    images = (torch.rand(samples, 1, 28, 28, generator=g) > 0.8).float()
    labels = (images[:, 0, :14].sum(dim=(1, 2)) % 10).long()
    modes = [False, True] if device.startswith("cuda") else [False]
    for kind, optimizer in (("classifier", "adam"), ("classifier", "sgd"), ("cvae", "adam")):
        rows = {}
        for graphs in modes:
            run(kind, optimizer, images[:256], labels[:256], epochs=1, device=device, graphs=graphs)  # warm-up
            rows[graphs] = run(kind, optimizer, images, labels, epochs=epochs, device=device, graphs=graphs)
        for graphs, (ms, losses) in rows.items():
            print(f"{kind:>10} {optimizer:>4} {'graph' if graphs else 'eager':>5} on {device}: "
                  f"{ms:6.2f} ms/step, epoch losses {', '.join(f'{l:.4f}' for l in losses)}")
        if len(rows) == 2:
            eager, graph = rows[False][1][-1], rows[True][1][-1]
            print(f"{'':>16} graph/eager speed-up {rows[False][0] / rows[True][0]:.1f}x, "
                  f"last-epoch loss ratio {graph / eager:.3f}")


if __name__ == "__main__":
    main()
