"""Throughput of the weight codec (``genfl_shared.codec``): encode, decode and the round trip.

Payloads:
  * ``cvae``: the real CVAE state_dict (1,072,150 float32 parameters, 4.29 MB);
  * ``64MiB``: a synthetic 64 MiB float32 state_dict (16 tensors of 4 MiB, like a big model).

Encode is ``encode_state_dict(state)`` (one copy into 1 MiB chunks + SHA-256). Decode is the
receive path exactly as the server and client run it: ``PayloadAssembler.add`` for each ``Chunk``
message (the messages are built before the timer starts, as gRPC hands them over), then
``finish()`` (digest check + tensor views). Round trip = bytes / (t_encode + t_decode).
Target: > 1 GB/s for each.

For context it also measures this machine's raw ``hashlib.sha256`` and memcpy throughput: the
protocol requires SHA-256 on both sides, so a single-threaded encode + decode hashes every byte
twice and cannot beat sha256_rate / 2 for the round trip.
"""

from __future__ import annotations

import hashlib
import time

import click
import numpy as np
import torch

import _common as c

TARGET_GBPS = 1.0


def _best_times(fn, repeats: int) -> list[float]:
    fn()  # warm-up (page faults, allocator)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def _big_state(total_bytes: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    per_tensor = 4 << 20
    count = total_bytes // per_tensor
    return {f"layer{i}.weight": torch.randn((1024, per_tensor // 4 // 1024), generator=gen) for i in range(count)}


def bench_payload(label: str, state: dict[str, torch.Tensor], repeats: int) -> None:
    from genfl_shared.codec import PayloadAssembler, encode_state_dict, state_dict_nbytes
    from genfl_shared.proto import genfl_pb2 as pb

    nbytes = state_dict_nbytes(state)
    t_enc = _best_times(lambda: encode_state_dict(state), repeats)
    payload = encode_state_dict(state)
    messages = [pb.Chunk(index=i, data=d) for i, d in enumerate(payload.chunks)]

    def decode():
        assembler = PayloadAssembler(payload.manifest, max_bytes=nbytes)
        for message in messages:
            assembler.add(message)
        return assembler.finish()

    def decode_floor():
        # Context: the least a SHA-256-checked decode must do (one copy + one hash per chunk, each
        # chunk's bytes read from the message once). Not the codec; shows its headroom.
        buffer, hasher, pos = bytearray(nbytes), hashlib.sha256(), 0
        for message in messages:
            data = message.data
            buffer[pos:pos + len(data)] = data
            hasher.update(data)
            pos += len(data)
        return hasher.digest()

    decoded = decode()
    for name, tensor in state.items():  # the benchmark decodes what it encoded
        if not torch.equal(decoded[name], tensor):
            raise AssertionError(f"round trip changed {name}")
    t_dec = _best_times(decode, repeats)
    t_floor = _best_times(decode_floor, repeats)
    enc, dec = c.median(t_enc), c.median(t_dec)
    size = f"{nbytes / c.MB:.2f} MB"
    c.result(f"codec {label} encode ({size})", nbytes / enc / c.GB, "GB/s", target=TARGET_GBPS, lower_is_better=False,
             extra=f"{enc * 1e3:.2f} ms")
    c.result(f"codec {label} decode ({size})", nbytes / dec / c.GB, "GB/s", target=TARGET_GBPS, lower_is_better=False,
             extra=f"{dec * 1e3:.2f} ms")
    c.result(f"  decode floor: copy + sha256, chunk read once ({size})", nbytes / c.median(t_floor) / c.GB, "GB/s",
             extra=f"{c.median(t_floor) * 1e3:.2f} ms")
    c.result(f"codec {label} round trip ({size})", nbytes / (enc + dec) / c.GB, "GB/s", target=TARGET_GBPS,
             lower_is_better=False, extra=f"{(enc + dec) * 1e3:.2f} ms")
    bench_server_receive(label, state, payload, repeats)


def bench_server_receive(label: str, state: dict[str, torch.Tensor], payload, repeats: int) -> None:
    from genfl_server.request_messages import parse_result_message
    from genfl_server.upload import ChunkedUpdate
    from genfl_shared.proto import genfl_pb2 as pb

    nbytes = payload.nbytes
    serialized = [pb.ResultMessage(chunk=pb.Chunk(index=i, data=d)).SerializeToString()
                  for i, d in enumerate(payload.chunks)]
    messages = [parse_result_message(data) for data in serialized]
    template = {name: tensor.clone() for name, tensor in state.items()}
    sums = {name: torch.zeros_like(tensor) for name, tensor in state.items()}

    def receive():
        update = ChunkedUpdate(payload.manifest, template, max_bytes=nbytes)
        for message in messages:
            update.add(message.chunk)
        return update.finish()

    update = receive()
    if update.distance != 0.0 or not all(torch.equal(update[name], state[name]) for name in state):
        raise AssertionError("the server's receive path changed the update")
    t_receive = _best_times(receive, repeats)
    t_fold = _best_times(lambda: update.fold_into(sums, 3.0), repeats)
    size = f"{nbytes / c.MB:.2f} MB"
    c.result(f"  server {label} receive: add + finish ({size})", nbytes / c.median(t_receive) / c.GB, "GB/s",
             extra=f"{c.median(t_receive) * 1e3:.2f} ms")
    c.result(f"  server {label} fold_into ({size})", nbytes / c.median(t_fold) / c.GB, "GB/s",
             extra=f"{c.median(t_fold) * 1e3:.2f} ms")


def bench_context(nbytes: int, repeats: int) -> None:
    data = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
    raw = data.tobytes()
    t_sha = _best_times(lambda: hashlib.sha256(raw).digest(), repeats)
    dest = np.empty_like(data)
    t_copy = _best_times(lambda: np.copyto(dest, data), repeats)
    t_bytes = _best_times(lambda: bytes(memoryview(data)), repeats)  # copy + allocation, like b"".join
    size = f"{nbytes / c.MB:.1f} MB"
    c.result(f"hashlib.sha256 ({size})", nbytes / c.median(t_sha) / c.GB, "GB/s")
    c.result(f"memcpy np.copyto ({size})", nbytes / c.median(t_copy) / c.GB, "GB/s")
    c.result(f"memcpy into new bytes ({size})", nbytes / c.median(t_bytes) / c.GB, "GB/s")
    c.result("round-trip ceiling (sha256 twice, 1 thread)", nbytes / (2 * c.median(t_sha)) / c.GB, "GB/s")


@click.command(context_settings={"show_default": True})
@click.option("--repeats", type=click.IntRange(1), default=7, help="Timed repeats per measurement.")
@click.option("--big-mib", type=click.IntRange(4), default=64, help="Size of the synthetic state_dict.")
def main(repeats: int, big_mib: int) -> None:
    """Encode/decode throughput of the real CVAE state_dict and of a large synthetic one."""
    from genfl_shared.models import build_model

    print(c.machine_line())
    torch.manual_seed(0)
    bench_payload("cvae", build_model("cvae").state_dict(), repeats)
    bench_payload(f"{big_mib}MiB", _big_state(big_mib << 20), repeats)
    bench_context(big_mib << 20, repeats)


if __name__ == "__main__":
    main()
