"""genfl_server/upload.py's ChunkedUpdate: an upload measured and folded chunk by chunk gives the
same tensors, distance and FedAvg sum as the whole decoded update, whatever the chunk size cuts
(tensors spanning chunks, an element cut by a chunk boundary, integer buffers); and it refuses a
hostile stream exactly as the client's PayloadAssembler does (one receiver's checks)."""

from __future__ import annotations

import pytest
import torch

from genfl_server.updates import update_distance
from genfl_server.strategy import FedAvg
from genfl_server.upload import ChunkedUpdate
from genfl_shared.codec import CodecError, PayloadAssembler, encode_state_dict
from genfl_shared.proto import genfl_pb2 as pb

pytestmark = pytest.mark.unit

CHUNK = 64  # bytes: every tensor below spans several chunks


def _template() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(7, 9, generator=gen), "half": torch.randn(5, generator=gen).half(),  # 10 bytes:
            "after_half": torch.randn(33, generator=gen),  # misaligned: its floats straddle chunks
            "n": torch.tensor(3, dtype=torch.int64), "b": torch.randn(40, generator=gen).double(),
            "empty": torch.zeros(0)}


def _update(template, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=gen).to(v.dtype)) if v.is_floating_point() else v + 1
            for k, v in template.items()}


def _received(state, template, chunks=None) -> ChunkedUpdate:
    payload = encode_state_dict(state, chunk_size=CHUNK)
    update = ChunkedUpdate(payload.manifest, template, max_bytes=1 << 20, chunk_size=CHUNK)
    for index, data in enumerate(payload.chunks if chunks is None else chunks):
        update.add(pb.Chunk(index=index, data=data))
    return update


def test_folding_chunk_by_chunk_matches_the_whole_update():
    template = _template()
    state = _update(template, 1)
    update = _received(state, template).finish()
    assert list(update) == list(template)
    assert all(torch.equal(update[k], state[k]) and update[k].dtype == state[k].dtype for k in state)
    assert update.distance == pytest.approx(update_distance(state, template), rel=1e-5)
    folded, whole = FedAvg(), FedAvg()
    for strategy, value in ((folded, update), (whole, dict(state))):
        strategy.begin(template)
        strategy.accumulate(value, 3)
        strategy.accumulate(_update(template, 2), 5)
    a, b = folded.finish(), whole.finish()
    assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-6) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("poison", ["digest", "nan"])
def test_an_update_refused_in_its_last_chunk_is_never_usable(poison):
    template = _template()
    state = _update(template, 1)
    chunks = list(encode_state_dict(state, chunk_size=CHUNK).chunks)
    if poison == "digest":
        chunks[-1] = chunks[-1][:-1] + bytes([chunks[-1][-1] ^ 1])
    else:
        state["b"][-1] = float("nan")  # "b" ends in the last chunk ("empty" holds no bytes)
        chunks = None
    with pytest.raises(CodecError) as info:
        _received(state, template, chunks).finish()
    assert info.value.reason == ("digest_mismatch" if poison == "digest" else "non_finite")


def test_an_unfinished_update_cannot_be_folded():
    template = _template()
    update = _received(_update(template, 1), template)
    strategy = FedAvg()
    strategy.begin(template)
    with pytest.raises(RuntimeError, match="finish"):
        strategy.accumulate(update, 1)


def test_the_round_guard_uses_the_measured_distance_only_against_its_own_model():
    from genfl_server.guard import UpdateGuard
    template = _template()
    update = _received(_update(template, 1), template).finish()
    same = UpdateGuard().round(template, {"a": 10})
    same.admit("a", 10, update)
    assert same.distances["a"] == update.distance
    other_model = {k: v.clone() for k, v in template.items()}
    other = UpdateGuard().round(other_model, {"a": 10})
    other.admit("a", 10, update)
    assert other.distances["a"] == pytest.approx(update_distance(update, other_model), rel=1e-12)


def _flip_first_byte(chunks):
    first = chunks[0]  # a low mantissa bit: still finite, so only the digest tells
    return [pb.Chunk(index=0, data=bytes([first.data[0] ^ 1]) + first.data[1:])] + chunks[1:]


# Each turns an upload's chunk messages (numbered as sent) into a hostile stream of them.
HOSTILE_STREAMS = {
    "swapped": lambda chunks: [chunks[0], chunks[2], chunks[1]] + chunks[3:],
    "repeated": lambda chunks: [chunks[0], chunks[0]] + chunks[1:],
    "short": lambda chunks: [pb.Chunk(index=0, data=chunks[0].data[:-1])] + chunks[1:],
    "one_too_many": lambda chunks: chunks + [pb.Chunk(index=len(chunks), data=chunks[-1].data)],
    "truncated": lambda chunks: chunks[:-1],
    "flipped": _flip_first_byte,
}


def _refusal(receiver, chunks) -> tuple[str, str]:
    with pytest.raises(CodecError) as info:
        for chunk in chunks:
            receiver.add(chunk)
        receiver.finish()
    return info.value.reason, str(info.value)


@pytest.mark.parametrize("stream", HOSTILE_STREAMS)
def test_server_and_client_refuse_a_hostile_stream_alike(stream):
    template = _template()
    payload = encode_state_dict(_update(template, 1), chunk_size=CHUNK)
    chunks = HOSTILE_STREAMS[stream]([pb.Chunk(index=i, data=data) for i, data in enumerate(payload.chunks)])
    server = _refusal(ChunkedUpdate(payload.manifest, template, max_bytes=1 << 20, chunk_size=CHUNK), chunks)
    client = _refusal(PayloadAssembler(payload.manifest, max_bytes=1 << 20, chunk_size=CHUNK), chunks)
    assert server == client
    assert server[0] == {"swapped": "chunk_order", "repeated": "chunk_order", "short": "bad_chunk",
                         "one_too_many": "bad_chunk", "truncated": "truncated",
                         "flipped": "digest_mismatch"}[stream]


@pytest.mark.parametrize("changes", [{"num_chunks": 1}, {"sha256": b"\x00" * 31}, {"total_bytes": 4}])
def test_server_and_client_refuse_a_hostile_manifest_alike(changes):
    template = _template()
    manifest = pb.Manifest()
    manifest.CopyFrom(encode_state_dict(_update(template, 1), chunk_size=CHUNK).manifest)
    for key, value in changes.items():
        setattr(manifest, key, value)
    refusals = []
    for receive in (lambda: ChunkedUpdate(manifest, template, max_bytes=1 << 20, chunk_size=CHUNK),
                    lambda: PayloadAssembler(manifest, max_bytes=1 << 20, chunk_size=CHUNK)):
        with pytest.raises(CodecError) as info:
            receive()
        refusals.append((info.value.reason, str(info.value)))
    assert refusals[0] == refusals[1] and refusals[0][0] == "bad_manifest"
