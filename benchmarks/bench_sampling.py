"""Seconds to sample the server's synthetic set (60,000 images) from a CVAE on the CPU.

Measures ``genfl_shared.synthetic.sample_synthetic`` end to end (latents, batched decoding,
per-image max normalisation and rounding, copy into the output tensor) with torch's default
thread count unless ``--threads`` says otherwise. The CVAE is a freshly initialised one: the decoder
costs the same whatever its weights. Target: < 2 s (median over repeats, after one warm-up).
"""

from __future__ import annotations

import time

import click
import torch

import _common as c

TARGET_SECONDS = 2.0


@click.command(context_settings={"show_default": True})
@click.option("--samples", type=click.IntRange(1), default=60_000, help="Images to sample.")
@click.option("--repeats", type=click.IntRange(1), default=7, help="Timed repeats (after one warm-up).")
@click.option("--batch-size", type=click.IntRange(1), default=10_000, help="sample_synthetic's batch size.")
@click.option("--threads", type=click.IntRange(0), default=0, help="Torch threads (0: torch's default).")
def main(samples: int, repeats: int, batch_size: int, threads: int) -> None:
    """Time sample_synthetic(cvae, N) on the CPU."""
    from genfl_shared.models import build_model
    from genfl_shared.synthetic import sample_synthetic

    if threads:
        torch.set_num_threads(threads)
    print(c.machine_line())
    torch.manual_seed(0)
    cvae = build_model("cvae")
    sample_synthetic(cvae, min(samples, 10_000), seed=0, device="cpu", batch_size=batch_size)  # warm-up
    times, cpu = [], []
    for rep in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        images, labels = sample_synthetic(cvae, samples, seed=rep, device="cpu", batch_size=batch_size)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    assert images.shape == (samples, 1, 28, 28) and len(labels) == samples
    c.result(f"sample_synthetic {samples} images ({torch.get_num_threads()} threads)", c.median(times), "s",
             target=TARGET_SECONDS,
             extra=f"min {min(times):.3f} max {max(times):.3f} | {samples / c.median(times):,.0f} img/s | "
                   f"CPU {c.median(cpu):.3f} s (CPU/wall {c.median(cpu) / c.median(times):.2f}: "
                   f"~{torch.get_num_threads()} when the machine is otherwise idle)")


if __name__ == "__main__":
    main()
