"""The weight codec: state_dict <-> (manifest, chunks), and every way a payload is refused."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from genfl_shared.codec import (
    CHUNK_SIZE,
    DTYPES,
    ChunkReceiver,
    CodecError,
    PayloadAssembler,
    check_matches_template,
    decode_payload,
    encode_state_dict,
    state_dict_nbytes,
)
from genfl_shared.models import build_model
from genfl_shared.proto import genfl_pb2 as pb

pytestmark = pytest.mark.unit


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes (compares NaN payloads, -0.0 and bools bit for bit)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_exact(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected), "names or their order differ"
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype, name
        assert have.shape == want.shape, name
        assert torch.equal(_bits(have), _bits(want)), f"{name}: bytes differ"


def roundtrip(state):
    payload = encode_state_dict(state)
    return payload, decode_payload(payload.manifest, payload.chunks)


def _chunk_msgs(payload):
    return [pb.Chunk(index=i, data=data) for i, data in enumerate(payload.chunks)]


# -- round trips ----------------------------------------------------------------------------------

def test_cvae_roundtrip_multi_chunk_bit_exact():
    torch.manual_seed(0)
    state = build_model("cvae").state_dict()
    payload, decoded = roundtrip(state)

    nbytes = state_dict_nbytes(state)
    assert nbytes > 4 * (1 << 20), "the CVAE should not fit in one default-sized gRPC message"
    assert payload.manifest.total_bytes == payload.nbytes == nbytes
    assert payload.manifest.num_chunks == len(payload.chunks) == math.ceil(nbytes / CHUNK_SIZE) >= 5
    assert CHUNK_SIZE == 1 << 20
    assert all(len(c) <= CHUNK_SIZE for c in payload.chunks)
    assert all(len(c) == CHUNK_SIZE for c in payload.chunks[:-1]), "only the last chunk may be short"
    assert sum(len(c) for c in payload.chunks) == nbytes
    assert payload.manifest.sha256 == hashlib.sha256(b"".join(payload.chunks)).digest()
    assert [(s.name, s.dtype, list(s.shape)) for s in payload.manifest.tensors] == [
        (k, "float32", list(v.shape)) for k, v in state.items()]
    assert_bit_exact(decoded, state)


def test_decoded_tensors_are_views_of_the_received_bytes_not_copies():
    """What the server folds is the upload's one receive buffer, read in place: every tensor
    starts at its manifest offset from the first (one model of memory per upload, no copy)."""
    torch.manual_seed(0)
    state = build_model("cvae").state_dict()
    _payload, decoded = roundtrip(state)
    base = next(iter(decoded.values())).data_ptr()
    offset = 0
    for name, tensor in decoded.items():
        assert tensor.data_ptr() - base == offset, name
        offset += tensor.numel() * tensor.element_size()


def test_classifier_roundtrip_includes_int64_scalar_buffers():
    torch.manual_seed(1)
    model = build_model("classifier")
    # Non-trivial BatchNorm statistics and counters (fresh ones are all 0/1).
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(int(torch.randint(0, 10**12, ())))
    state = model.state_dict()
    counters = [k for k, v in state.items() if v.dtype == torch.int64]
    assert counters and all(state[k].dim() == 0 for k in counters)
    assert {v.dtype for v in state.values()} == {torch.float32, torch.int64}

    payload, decoded = roundtrip(state)
    assert all(len(c) <= CHUNK_SIZE for c in payload.chunks)
    assert {s.dtype for s in payload.manifest.tensors} == {"float32", "int64"}
    assert_bit_exact(decoded, state)
    for k in counters:
        assert decoded[k].shape == torch.Size([]) and decoded[k].item() == state[k].item()


def _sample(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 1000).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


def test_every_allowed_dtype_roundtrips_including_scalars_and_empty_tensors():
    gen = torch.Generator().manual_seed(2)
    state = {}
    for name, dtype in DTYPES.items():
        state[f"{name}.matrix"] = _sample(dtype, (3, 5), gen)  # 1-2 byte types leave later ones unaligned
        state[f"{name}.scalar"] = _sample(dtype, (), gen)
        state[f"{name}.empty"] = torch.empty((0, 4), dtype=dtype)
        state[f"{name}.odd"] = _sample(dtype, (7,), gen)
    # Values whose bits matter: signed zero, infinities, NaN (the codec moves bytes, it does not judge).
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40])
    for name in ("float32", "float64", "float16", "bfloat16"):
        state[f"{name}.special"] = specials.to(DTYPES[name])
    state["bool.all"] = torch.tensor([True, False, True])
    state["int64.extremes"] = torch.tensor([torch.iinfo(torch.int64).min, -1, 0, torch.iinfo(torch.int64).max])

    payload, decoded = roundtrip(state)
    assert {s.dtype for s in payload.manifest.tensors} == set(DTYPES)
    assert_bit_exact(decoded, state)
    for name, dtype in DTYPES.items():
        assert decoded[f"{name}.scalar"].shape == torch.Size([])
        assert decoded[f"{name}.empty"].shape == (0, 4) and decoded[f"{name}.empty"].dtype == dtype


def test_small_chunk_size_splits_tensors_across_chunks():
    gen = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(10, generator=gen), "b": torch.arange(5, dtype=torch.int64),
             "c": torch.tensor(True), "d": torch.randn(3, generator=gen).to(torch.float16)}
    payload = encode_state_dict(state, chunk_size=7)
    total = state_dict_nbytes(state)
    assert payload.manifest.num_chunks == math.ceil(total / 7) == len(payload.chunks)
    assert all(len(c) == 7 for c in payload.chunks[:-1]) and 0 < len(payload.chunks[-1]) <= 7
    decoded = decode_payload(payload.manifest, payload.chunks, chunk_size=7)
    assert_bit_exact(decoded, state)


def test_non_contiguous_and_grad_tensors_encode_by_value():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    param = torch.nn.Parameter(torch.ones(2, 2))
    state = {"t": base.t(), "slice": base[:, 1], "param": param}
    _, decoded = roundtrip(state)
    assert torch.equal(decoded["t"], base.t())
    assert torch.equal(decoded["slice"], base[:, 1])
    assert torch.equal(decoded["param"], torch.ones(2, 2)) and not decoded["param"].requires_grad


def test_empty_tensor_with_huge_dimensions_still_decodes():
    state = {"x": torch.empty((1 << 40, 0), dtype=torch.float64), "y": torch.ones(2)}
    _, decoded = roundtrip(state)
    assert_bit_exact(decoded, state)


def test_empty_state_roundtrips():
    payload, decoded = roundtrip({})
    assert payload.manifest.num_chunks == 0 and payload.chunks == () and decoded == {}


def test_encode_is_deterministic():
    torch.manual_seed(4)
    state = build_model("classifier").state_dict()
    first = encode_state_dict(state)
    second = encode_state_dict(state)
    copied = encode_state_dict({k: v.clone() for k, v in state.items()})  # other memory, same values
    for other in (second, copied):
        assert other.chunks == first.chunks
        assert other.manifest.sha256 == first.manifest.sha256
        assert other.manifest.SerializeToString(deterministic=True) == \
            first.manifest.SerializeToString(deterministic=True)
    # ... and it depends on the values: one changed element changes the digest.
    changed = dict(state)
    key = next(k for k, v in state.items() if v.is_floating_point())
    changed[key] = state[key].clone()
    changed[key].view(-1)[0] += 1
    assert encode_state_dict(changed).manifest.sha256 != first.manifest.sha256


def test_unsupported_dtype_is_refused_at_encode():
    with pytest.raises(TypeError):
        encode_state_dict({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError):
        encode_state_dict({"x": [1.0, 2.0]})


# -- decoding failures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cvae_payload():
    torch.manual_seed(5)
    state = build_model("cvae").state_dict()
    return state, encode_state_dict(state)


def test_flipped_byte_is_digest_mismatch(cvae_payload):
    _, payload = cvae_payload
    chunks = list(payload.chunks)
    corrupted = bytearray(chunks[2])
    corrupted[12345] ^= 0x01
    chunks[2] = bytes(corrupted)
    with pytest.raises(CodecError) as info:
        decode_payload(payload.manifest, chunks)
    assert info.value.reason == "digest_mismatch"


def test_missing_last_chunk_is_truncated(cvae_payload):
    _, payload = cvae_payload
    with pytest.raises(CodecError) as info:
        decode_payload(payload.manifest, payload.chunks[:-1])
    assert info.value.reason == "truncated"


def test_out_of_order_chunks_are_refused(cvae_payload):
    _, payload = cvae_payload
    msgs = _chunk_msgs(payload)
    msgs[1], msgs[2] = msgs[2], msgs[1]
    with pytest.raises(CodecError) as info:
        decode_payload(payload.manifest, msgs)
    assert info.value.reason == "chunk_order"
    # A repeated chunk is out of order too.
    assembler = PayloadAssembler(payload.manifest, max_bytes=payload.nbytes)
    assembler.add(msgs[0])
    with pytest.raises(CodecError) as info:
        assembler.add(msgs[0])
    assert info.value.reason == "chunk_order"


def test_wrongly_sized_chunk_is_refused(cvae_payload):
    _, payload = cvae_payload
    assembler = PayloadAssembler(payload.manifest, max_bytes=payload.nbytes)
    with pytest.raises(CodecError) as info:
        assembler.add(pb.Chunk(index=0, data=payload.chunks[0][:-1]))
    assert info.value.reason == "bad_chunk"


class _Recorder(ChunkReceiver):
    """A receiver that only records what it is handed."""

    def __init__(self, manifest):
        super().__init__(manifest, max_bytes=1 << 30)
        self.kept, self.completed = [], False

    def _keep(self, index, start, data):
        self.kept.append((index, start, bytes(data)))

    def _complete(self):
        self.completed = True
        return "made"


def test_a_receiver_is_handed_each_chunk_once_checked_and_completes_only_after_the_digest(cvae_payload):
    _, payload = cvae_payload
    receiver = _Recorder(payload.manifest)
    msgs = _chunk_msgs(payload)
    for msg in msgs:
        receiver.add(msg)
    assert receiver.kept == [(i, i * CHUNK_SIZE, data) for i, data in enumerate(payload.chunks)]
    assert receiver.finish() == "made" and receiver.received_bytes == payload.nbytes
    refused = _Recorder(payload.manifest)
    refused.add(msgs[0])
    with pytest.raises(CodecError):
        refused.add(pb.Chunk(index=1, data=msgs[1].data[:-1]))  # a wrong size is never handed over
    with pytest.raises(CodecError):
        refused.add(msgs[2])
    assert [index for index, _start, _data in refused.kept] == [0]
    flipped = _Recorder(payload.manifest)
    for msg in msgs[:-1]:
        flipped.add(msg)
    flipped.add(pb.Chunk(index=msgs[-1].index, data=bytes([msgs[-1].data[0] ^ 1]) + msgs[-1].data[1:]))
    with pytest.raises(CodecError) as info:
        flipped.finish()
    assert info.value.reason == "digest_mismatch" and not flipped.completed


def _manifest(payload, **changes) -> pb.Manifest:
    manifest = pb.Manifest()
    manifest.CopyFrom(payload.manifest)
    for key, value in changes.items():
        setattr(manifest, key, value)
    return manifest


def test_manifest_total_bytes_mismatch_is_bad_manifest(cvae_payload):
    _, payload = cvae_payload
    for total in (payload.nbytes - 4, payload.nbytes + 4):
        with pytest.raises(CodecError) as info:
            PayloadAssembler(_manifest(payload, total_bytes=total), max_bytes=1 << 30)
        assert info.value.reason == "bad_manifest"


def test_other_inconsistent_manifests_are_bad_manifest(cvae_payload):
    _, payload = cvae_payload
    cases = [
        _manifest(payload, num_chunks=payload.manifest.num_chunks + 1),
        _manifest(payload, sha256=b"\x00" * 31),
    ]
    dup = _manifest(payload)
    dup.tensors.append(pb.TensorSpec(name=dup.tensors[0].name, dtype="float32", shape=[0]))
    cases.append(dup)
    neg = pb.Manifest(tensors=[pb.TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
                      total_bytes=0, sha256=b"\x00" * 32, num_chunks=0)
    cases.append(neg)
    # Empty, yet a size torch cannot represent: must be refused, not crash decoding.
    overflow = pb.Manifest(tensors=[pb.TensorSpec(name="x", dtype="float32", shape=[1 << 62, 1 << 62, 0])],
                           total_bytes=0, sha256=hashlib.sha256(b"").digest(), num_chunks=0)
    cases.append(overflow)
    for manifest in cases:
        with pytest.raises(CodecError) as info:
            PayloadAssembler(manifest, max_bytes=1 << 30)
        assert info.value.reason == "bad_manifest"


@pytest.mark.parametrize("dtype", ["complex64", "object", "float", "torch.float32", "", "FLOAT32"])
def test_disallowed_dtype_string_is_bad_dtype(dtype):
    manifest = pb.Manifest(tensors=[pb.TensorSpec(name="x", dtype=dtype, shape=[2])],
                           total_bytes=8, sha256=b"\x00" * 32, num_chunks=1)
    with pytest.raises(CodecError) as info:
        PayloadAssembler(manifest, max_bytes=1 << 30)
    assert info.value.reason == "bad_dtype"


def test_oversized_manifest_is_refused_before_allocating():
    # A consistent manifest claiming 8 TiB: allocating its buffer would fail with MemoryError
    # (or take the machine down), so getting CodecError proves the check comes first.
    huge = 1 << 40
    manifest = pb.Manifest(tensors=[pb.TensorSpec(name="x", dtype="float64", shape=[huge])],
                           total_bytes=huge * 8, sha256=b"\x00" * 32,
                           num_chunks=math.ceil(huge * 8 / CHUNK_SIZE))
    with pytest.raises(CodecError) as info:
        PayloadAssembler(manifest, max_bytes=1 << 20)
    assert info.value.reason == "oversized"


def test_max_bytes_boundary():
    state = {"a": torch.ones(256), "b": torch.zeros(10, dtype=torch.int64)}  # 1024 + 80 bytes
    payload = encode_state_dict(state)
    assert torch.equal(decode_payload(payload.manifest, payload.chunks, max_bytes=1104)["a"], state["a"])
    with pytest.raises(CodecError) as info:
        decode_payload(payload.manifest, payload.chunks, max_bytes=1103)
    assert info.value.reason == "oversized"


# -- template checks ------------------------------------------------------------------------------

@pytest.fixture
def template():
    return {"w": torch.randn(4, 3), "b": torch.zeros(4), "n": torch.tensor(7, dtype=torch.int64)}


def _reason(state, template) -> str:
    with pytest.raises(CodecError) as info:
        check_matches_template(state, template)
    return info.value.reason


def test_template_accepts_a_matching_update(template):
    check_matches_template({k: v.clone() + 1 for k, v in template.items()}, template)
    _, decoded = roundtrip(template)
    check_matches_template(decoded, template)


def test_template_missing_tensor(template):
    state = dict(template)
    del state["b"]
    assert _reason(state, template) == "missing_tensor"


def test_template_extra_tensor(template):
    assert _reason(dict(template, sneaky=torch.zeros(1)), template) == "extra_tensor"


def test_template_bad_shape(template):
    assert _reason(dict(template, w=torch.randn(3, 4)), template) == "bad_shape"  # same numel
    assert _reason(dict(template, n=torch.tensor([7])), template) == "bad_shape"  # 0-d vs 1-d


def test_template_bad_dtype(template):
    assert _reason(dict(template, w=template["w"].double()), template) == "bad_dtype"
    assert _reason(dict(template, n=torch.tensor(7, dtype=torch.int32)), template) == "bad_dtype"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_template_non_finite(template, value):
    w = template["w"].clone()
    w[2, 1] = value
    assert _reason(dict(template, w=w), template) == "non_finite"
    # Half precision is checked too.
    half_template = {"h": torch.zeros(3, dtype=torch.bfloat16)}
    assert _reason({"h": torch.tensor([0.0, value, 1.0], dtype=torch.bfloat16)}, half_template) == "non_finite"
