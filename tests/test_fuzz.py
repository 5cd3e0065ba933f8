"""Fuzzing (hypothesis, bounded): whatever bytes a peer sends, the codec raises only ``CodecError``,
protobuf parsing only ``DecodeError``, and the server answers every RPC with a deliberate gRPC
status, stays up, and aggregates exactly the good updates.

Every property runs a bounded number of examples (``deadline=None``: timings on a loaded CI
machine say nothing about correctness) and keeps no example database in the repository.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genfl_server.coordinator import Coordinator
from genfl_server.metrics import ServerMetrics
from genfl_server.strategy import FedAvg
from genfl_server.upload import ChunkedUpdate
from genfl_shared.codec import (CHUNK_SIZE, DTYPES, MAX_MESSAGE_BYTES, CodecError, PayloadAssembler, check_matches_template,
                                decode_payload, encode_state_dict, state_dict_nbytes)
from genfl_shared.models import build_model
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import EvaluateTask, TrainTask
from helpers import loopback_server, run_rounds, start_server
from wire_strategies import mutated_bytes


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.filter_too_much])


MAX_BYTES = 4 << 20  # the decoder's memory limit in these tests: a few MiB
RPC_TIMEOUT = 20.0
SERVICE = "/genfl.v2.FederatedLearning"
Code = grpc.StatusCode

# -- strategies -----------------------------------------------------------------------------------

# Protobuf string fields must be valid UTF-8: any character but a lone surrogate.
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
names = st.one_of(st.sampled_from(["w", "encoder.1.weight", "", "a" * 200]), texts)
dtype_names = st.one_of(
    st.sampled_from(sorted(DTYPES)),
    st.sampled_from(["complex64", "float", "torch.float32", "FLOAT32", "qint8", "uint16", "float8_e4m3fn",
                     "float32\x00", " float32", ""]),
    texts)
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
dims = st.one_of(st.integers(0, 6), INT64,
                 st.sampled_from([-1, 1 << 31, 1 << 32, 1 << 61, 1 << 62, (1 << 63) - 1, -(1 << 63)]))
shapes = st.lists(dims, max_size=6)
specs = st.builds(lambda n, d, s: pb.TensorSpec(name=n, dtype=d, shape=s), names, dtype_names, shapes)
UINT64 = st.integers(0, (1 << 64) - 1)
UINT32 = st.integers(0, (1 << 32) - 1)


def honest_size(manifest_specs) -> int | None:
    """Bytes the specs need, or None when some spec is invalid anyway."""
    total = 0
    for spec in manifest_specs:
        if spec.dtype not in DTYPES or any(d < 0 for d in spec.shape):
            return None
        total += math.prod(spec.shape) * torch.empty((), dtype=DTYPES[spec.dtype]).element_size()
    return total


@st.composite
def random_payloads(draw):
    """A random manifest with chunks: sometimes honest (consistent sizes, right digest), sometimes
    not, always with some chance of a random field."""
    chunk_size = draw(st.sampled_from([7, 64, 1000, CHUNK_SIZE]))
    tensor_specs = draw(st.lists(specs, max_size=5))
    need = honest_size(tensor_specs)
    data = b""
    if need is not None and need <= 64 << 10:
        data = random.Random(draw(st.integers(0, 1 << 32))).randbytes(need)
    honest_chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    manifest = pb.Manifest(
        tensors=tensor_specs,
        total_bytes=draw(st.one_of(st.just(len(data)), UINT64)),
        sha256=draw(st.one_of(st.just(hashlib.sha256(data).digest()), st.binary(max_size=40))),
        num_chunks=draw(st.one_of(st.just(len(honest_chunks)), UINT32)))
    chunk_list = draw(st.one_of(
        st.just([pb.Chunk(index=i, data=d) for i, d in enumerate(honest_chunks)]),
        st.lists(st.builds(lambda i, d: pb.Chunk(index=i, data=d), st.one_of(st.integers(0, 8), UINT32),
                           st.binary(max_size=2 * chunk_size if chunk_size < 1000 else 1100)), max_size=12)))
    if chunk_list and draw(st.booleans()):
        chunk_list = mutate_chunks(draw, chunk_list)
    return manifest, chunk_list, chunk_size


def mutate_chunks(draw, chunks: list[pb.Chunk]) -> list[pb.Chunk]:
    """One change to a chunk sequence: flip, truncate, extend, drop, duplicate, swap, reindex, cut."""
    chunks = [pb.Chunk(index=c.index, data=c.data) for c in chunks]
    i = draw(st.integers(0, len(chunks) - 1))
    op = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "duplicate", "swap", "reindex", "cut"]))
    data = chunks[i].data
    if op == "flip" and data:
        pos = draw(st.integers(0, len(data) - 1))
        flipped = bytearray(data)
        flipped[pos] ^= draw(st.integers(1, 255))
        chunks[i].data = bytes(flipped)
    elif op == "truncate" and data:
        chunks[i].data = data[:draw(st.integers(0, len(data) - 1))]
    elif op == "extend":
        chunks[i].data = data + draw(st.binary(min_size=1, max_size=16))
    elif op == "drop":
        del chunks[i]
    elif op == "duplicate":
        chunks.insert(i, pb.Chunk(index=chunks[i].index, data=data))
    elif op == "swap" and len(chunks) > 1:
        j = draw(st.integers(0, len(chunks) - 1).filter(lambda j: j != i))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif op == "reindex":
        chunks[i].index = draw(UINT32.filter(lambda n: n != chunks[i].index))
    elif op == "cut":
        chunks = chunks[:i]
    return chunks


def check_decoded(state, manifest: pb.Manifest) -> None:
    """A payload that decoded must be exactly what its manifest describes."""
    assert list(state) == [s.name for s in manifest.tensors]
    raw = b""
    for spec in manifest.tensors:
        tensor = state[spec.name]
        assert tensor.dtype == DTYPES[spec.dtype] and tuple(tensor.shape) == tuple(spec.shape)
        raw += tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    assert len(raw) == manifest.total_bytes and hashlib.sha256(raw).digest() == manifest.sha256


# -- (a) the decoder ------------------------------------------------------------------------------

@pytest.mark.unit
@given(case=random_payloads(), as_bytes=st.booleans())
@fuzz_settings(300)
def test_decoder_random_manifests_raise_only_codec_error(case, as_bytes):
    manifest, chunks, chunk_size = case
    tracemalloc.start()
    try:
        if as_bytes:  # decode_payload numbers raw byte chunks itself
            state = decode_payload(manifest, [c.data for c in chunks], max_bytes=MAX_BYTES, chunk_size=chunk_size)
        else:
            assembler = PayloadAssembler(manifest, max_bytes=MAX_BYTES, chunk_size=chunk_size)
            for chunk in chunks:
                assembler.add(chunk)
            state = assembler.finish()
    except CodecError as error:
        assert error.reason in {"bad_dtype", "bad_manifest", "oversized", "chunk_order", "bad_chunk",
                                "truncated", "digest_mismatch"}, error.reason
        state = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Never more memory than the limit (plus bookkeeping), whatever total_bytes or shapes claim.
    assert peak < MAX_BYTES + (1 << 20), f"decoder allocated {peak} bytes"
    if state is not None:
        check_decoded(state, manifest)


@pytest.fixture(scope="module")
def classifier_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model("classifier").state_dict().items()}  # 134 tensors, int64 too


REAL_CHUNK = 256 << 10  # cut the 3.7 MB classifier into 15 chunks


@st.composite
def manifest_mutations(draw, manifest: pb.Manifest, *, reorder: bool = True) -> pb.Manifest:
    """One change to a real manifest's fields. ``reorder=False`` leaves out swapping two specs: that
    only says the bytes hold the tensors in another order, a valid (if garbled) update."""
    mutated = pb.Manifest()
    mutated.CopyFrom(manifest)
    k = draw(st.integers(0, len(mutated.tensors) - 1))
    spec = mutated.tensors[k]
    op = draw(st.sampled_from(["total_bytes", "num_chunks", "sha256", "dtype", "shape", "name", "drop_spec",
                               "dup_spec", "add_spec"] + (["swap_specs"] if reorder else [])))
    if op == "total_bytes":
        mutated.total_bytes = draw(st.one_of(UINT64, st.integers(max(0, manifest.total_bytes - 8),
                                                                 manifest.total_bytes + 8)))
    elif op == "num_chunks":
        mutated.num_chunks = draw(st.one_of(UINT32, st.integers(0, manifest.num_chunks + 2)))
    elif op == "sha256":
        mutated.sha256 = draw(st.binary(max_size=40))
    elif op == "dtype":
        spec.dtype = draw(dtype_names)
    elif op == "shape":
        del spec.shape[:]
        spec.shape.extend(draw(st.one_of(shapes, st.permutations(list(manifest.tensors[k].shape)))))
    elif op == "name":
        spec.name = draw(st.one_of(names, st.sampled_from([t.name for t in manifest.tensors])))
    elif op == "drop_spec":
        del mutated.tensors[k]
    elif op == "dup_spec":
        mutated.tensors.insert(k, manifest.tensors[k])
    elif op == "add_spec":
        mutated.tensors.insert(k, draw(specs))
    elif op == "swap_specs":
        j = draw(st.integers(0, len(mutated.tensors) - 1))
        a, b = pb.TensorSpec(), pb.TensorSpec()
        a.CopyFrom(mutated.tensors[k])
        b.CopyFrom(mutated.tensors[j])
        mutated.tensors[k].CopyFrom(b)
        mutated.tensors[j].CopyFrom(a)
    return mutated


@pytest.mark.unit
@given(data=st.data())
@fuzz_settings(200)
def test_decoder_mutated_real_payload_raises_only_codec_error(classifier_state, data):
    payload = _classifier_payload(classifier_state)
    chunks = [pb.Chunk(index=i, data=d) for i, d in enumerate(payload.chunks)]
    manifest = payload.manifest
    touch_data = data.draw(st.booleans(), label="mutate chunks")
    touch_manifest = not touch_data or data.draw(st.booleans(), label="mutate manifest too")
    if touch_data:
        chunks = mutate_chunks(data.draw, chunks)
    if touch_manifest:
        manifest = data.draw(manifest_mutations(manifest), label="manifest")
    # The server's receiver makes the same checks (with the template's, and finiteness, on the way):
    # it accepts exactly what the client's accepts and passes check_matches_template, bit for bit.
    try:
        with one_torch_thread():
            update = ChunkedUpdate(manifest, classifier_state, max_bytes=MAX_BYTES, chunk_size=REAL_CHUNK)
            for chunk in chunks:
                update.add(chunk)
            update = update.finish()
    except CodecError:
        update = None
    try:
        assembler = PayloadAssembler(manifest, max_bytes=MAX_BYTES, chunk_size=REAL_CHUNK)
        for chunk in chunks:
            assembler.add(chunk)
        state = assembler.finish()
        check_decoded(state, manifest)
        check_matches_template(state, classifier_state)
    except CodecError:
        assert update is None, "the server accepted an upload the client's receiver refuses"
        return
    assert update is not None and all(torch.equal(update[k], state[k]) for k in state)
    if not touch_manifest:  # only the bytes changed: success means they were the original bytes
        assert all(torch.equal(state[k], classifier_state[k]) for k in classifier_state)


@contextmanager
def one_torch_thread():
    # A chunk's distance is a few small torch ops: on a shared machine, intra-op threads cost
    # many times what they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_PAYLOADS: dict[int, object] = {}


def _classifier_payload(state):
    key = id(state)
    if key not in _PAYLOADS:
        _PAYLOADS[key] = encode_state_dict(state, chunk_size=REAL_CHUNK)
    return _PAYLOADS[key]


@pytest.mark.unit
def test_decoder_unmutated_real_payload_round_trips(classifier_state):
    payload = _classifier_payload(classifier_state)
    assert payload.manifest.num_chunks == 15 and state_dict_nbytes(classifier_state) < MAX_BYTES
    state = decode_payload(payload.manifest, payload.chunks, max_bytes=MAX_BYTES, chunk_size=REAL_CHUNK)
    check_matches_template(state, classifier_state)
    assert all(torch.equal(state[k], classifier_state[k]) for k in classifier_state)


# -- (b) the protobuf layer -----------------------------------------------------------------------

def _valid_messages() -> list[bytes]:
    header = pb.ResultHeader(run_id="r", task_id="r-1", client_id="alice", phase="cvae", round=3,
                             type=pb.TASK_TYPE_TRAIN, num_samples=10, metrics={"loss": 0.5, "accuracy": 0.9})
    header.manifest.CopyFrom(encode_state_dict({"w": torch.arange(6.0).reshape(2, 3)}).manifest)
    task = pb.TaskHeader(run_id="r", task_id="r-1", type=pb.TASK_TYPE_TRAIN, phase="cvae", round=3,
                         train=pb.TrainTask(epochs=1), manifest=header.manifest)
    return [pb.ResultMessage(header=header).SerializeToString(),
            pb.ResultMessage(chunk=pb.Chunk(index=2, data=b"\x01" * 40)).SerializeToString(),
            pb.TaskMessage(header=task).SerializeToString(),
            pb.RegisterRequest(client_id="alice", num_train_samples=100, num_heldout_samples=20,
                               dataset="mnist", client_version="0.1").SerializeToString()]


wire_bytes = st.one_of(st.binary(max_size=300), mutated_bytes(_valid_messages()))
MESSAGE_TYPES = [pb.ResultMessage, pb.TaskMessage, pb.RegisterRequest, pb.FetchTaskRequest, pb.Manifest,
                 pb.ResultHeader, pb.TaskHeader, pb.SubmitReply, pb.RegisterReply]


@pytest.mark.unit
@given(data=wire_bytes, message_type=st.sampled_from(MESSAGE_TYPES))
@fuzz_settings(500)
def test_protobuf_parses_or_raises_decode_error(data, message_type):
    try:
        message = message_type.FromString(data)
    except DecodeError:
        return
    # What parsed re-serialises to something that parses to the same message.
    again = message_type.FromString(message.SerializeToString())
    assert again.SerializeToString(deterministic=True) == message.SerializeToString(deterministic=True)


# -- (c) a real server on loopback -----------------------------------------------------------------

RUN_ID = "run-fuzz"
DATASET = "mnist"
SAMPLES = {"alice": (100, 20), "bob": (50, 10)}
TRAIN_SETTINGS = TrainTask(model="cvae", epochs=1, batch_size=32, optimizer="adam", lr=0.001, sgd_momentum=0.0,
                           binarize=True, seed=1)
EVALUATE_SETTINGS = EvaluateTask(model="cvae", binarize=True, seed=1)
SUBMIT_CODES = {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND, Code.DATA_LOSS,
                Code.RESOURCE_EXHAUSTED, Code.PERMISSION_DENIED, Code.ALREADY_EXISTS}
REGISTER_CODES = {Code.OK, Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
FETCH_CODES = {Code.OK, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED}
# The server's answer to bytes that do not parse as the request type (refused as "malformed").
UNPARSABLE_DETAILS = "a message does not parse as "


def unparsable(code: grpc.StatusCode, details: str) -> bool:
    return code == Code.INVALID_ARGUMENT and details.startswith(UNPARSABLE_DETAILS)


@dataclass
class Target:
    """What the fuzzer knows about the run it attacks: real ids to mix with random ones, and one
    task (the victim) whose valid result it mutates."""

    run_id: str
    client_ids: list[str]
    task_ids: list[str]
    victim: pb.ResultHeader  # a valid header for the victim task, manifest included
    chunks: tuple[bytes, ...]  # the victim update's chunks
    codes: dict = field(default_factory=dict)  # outcome counts, for the report

    def count(self, rpc: str, code: grpc.StatusCode) -> None:
        self.codes[(rpc, code.name)] = self.codes.get((rpc, code.name), 0) + 1


def one_of_known(values, other=texts):
    return st.one_of(st.sampled_from(values), other)


@st.composite
def random_results(draw, target: Target) -> list[pb.ResultMessage]:
    """A structured but random SubmitResult stream: real ids mixed with random ones."""
    header = pb.ResultHeader(
        run_id=draw(one_of_known([target.run_id])), task_id=draw(one_of_known(target.task_ids)),
        client_id=draw(one_of_known(target.client_ids)), phase=draw(one_of_known(["cvae", "classifier"])),
        session_secret=draw(one_of_known([target.victim.session_secret])),
        round=draw(st.one_of(st.integers(0, 3), UINT32)),
        type=draw(st.one_of(st.sampled_from(list(pb.TaskType.values())), st.integers(-(1 << 31), (1 << 31) - 1))),
        num_samples=draw(st.one_of(st.integers(0, 120), UINT64)),
        metrics=draw(st.dictionaries(texts, st.floats(), max_size=3)))
    if draw(st.booleans()):
        header.manifest.CopyFrom(draw(st.one_of(
            st.just(target.victim.manifest),
            st.builds(lambda t, n, s, c: pb.Manifest(tensors=t, total_bytes=n, sha256=s, num_chunks=c),
                      st.lists(specs, max_size=3), st.one_of(st.integers(0, 1 << 12), UINT64),
                      st.binary(max_size=40), st.one_of(st.integers(0, 6), UINT32)))))
    messages = [pb.ResultMessage(header=header)]
    messages += [pb.ResultMessage(chunk=pb.Chunk(index=i, data=d)) for i, d in draw(st.lists(
        st.tuples(st.one_of(st.integers(0, 6), UINT32), st.binary(max_size=64)), max_size=6))]
    if draw(st.booleans()):
        messages = draw(st.permutations(messages))
    return messages


@st.composite
def mutated_results(draw, target: Target) -> list[pb.ResultMessage]:
    """The victim's valid result with exactly one change that makes it invalid."""
    header = pb.ResultHeader()
    header.CopyFrom(target.victim)
    chunks = [pb.Chunk(index=i, data=d) for i, d in enumerate(target.chunks)]
    v = target.victim
    op = draw(st.sampled_from(["run_id", "task_id", "client_id", "phase", "round", "type", "num_samples",
                               "no_manifest", "manifest", "chunks", "no_header", "extra_header", "empty"]))
    if op == "run_id":
        header.run_id = draw(texts.filter(lambda s: s != v.run_id))
    elif op == "task_id":
        header.task_id = draw(one_of_known(target.task_ids).filter(lambda s: s != v.task_id))
    elif op == "client_id":
        header.client_id = draw(one_of_known(target.client_ids).filter(lambda s: s != v.client_id))
    elif op == "phase":
        header.phase = draw(one_of_known(["classifier", "CVAE"]).filter(lambda s: s != v.phase))
    elif op == "round":
        header.round = draw(UINT32.filter(lambda n: n != v.round))
    elif op == "type":
        header.type = draw(st.one_of(st.sampled_from(list(pb.TaskType.values())),
                                     st.integers(-(1 << 31), (1 << 31) - 1)).filter(lambda t: t != v.type))
    elif op == "num_samples":  # the victim's client registered exactly v.num_samples training samples
        header.num_samples = draw(st.one_of(st.just(0), st.integers(v.num_samples + 1, (1 << 64) - 1)))
    elif op == "no_manifest":
        header.ClearField("manifest")
    elif op == "manifest":
        mutated = draw(manifest_mutations(v.manifest, reorder=False).filter(
            lambda m: m.SerializeToString(deterministic=True) != v.manifest.SerializeToString(deterministic=True)))
        header.manifest.CopyFrom(mutated)
    elif op == "chunks":
        chunks = mutate_chunks(draw, chunks)
        if [(c.index, c.data) for c in chunks] == [(i, d) for i, d in enumerate(target.chunks)]:
            chunks = chunks[:-1]  # a no-op mutation (e.g. flip of an empty chunk): cut instead
    messages = [pb.ResultMessage(header=header)] + [pb.ResultMessage(chunk=c) for c in chunks]
    if op == "no_header":
        messages = messages[1:]
    elif op == "extra_header":
        messages.insert(draw(st.integers(1, len(messages))), pb.ResultMessage(header=header))
    elif op == "empty":
        messages = []
    return messages


raw_streams = st.lists(wire_bytes, max_size=5)
GARBAGE = b"\xff\xff\xff"  # never parses: a truncated varint


def _unparsable(data: bytes) -> bool:
    try:
        pb.ResultMessage.FromString(data)
    except DecodeError:
        return True
    return False


@st.composite
def spliced_raw_streams(draw, target: Target) -> list[bytes]:
    """The victim's valid stream, serialised, with bytes that do not parse spliced in, put in place
    of a message, or appended: the server refuses the call as malformed, and the result must not count."""
    messages = [m.SerializeToString() for m in messages_of(target.victim, target.chunks)]
    position = draw(st.integers(0, len(messages)))
    # Only bytes that really do not parse: a mutation that still parses could be a valid result
    # (a flipped bit in a metric, say), which the server rightly accepts.
    junk = draw(st.one_of(st.just(GARBAGE), mutated_bytes([messages[min(position, len(messages) - 1)][:4096]]),
                          st.binary(max_size=64)).filter(_unparsable))
    if position == len(messages) or draw(st.booleans()):
        messages.insert(position, junk)
    else:
        messages[position] = junk
    return messages


def fuzz_actions(target: Target) -> dict[str, st.SearchStrategy]:
    """The attacks, by family; each family gets its own example budget."""
    return {
        "mutated results": st.tuples(st.just("submit"), mutated_results(target)),
        "random results": st.tuples(st.just("submit"), random_results(target)),
        "raw bytes": st.one_of(st.tuples(st.just("submit_raw"), raw_streams),
                               st.tuples(st.just("submit_raw"), spliced_raw_streams(target)),
                               st.tuples(st.just("register_raw"), wire_bytes),
                               st.tuples(st.just("fetch_raw"), wire_bytes)),
        "register and fetch": st.one_of(
            st.tuples(st.just("register"), st.builds(
                pb.RegisterRequest,
                client_id=one_of_known(target.client_ids + ["carol", "x" * 129, "tab\there"]),
                num_train_samples=st.one_of(st.sampled_from([0, 50, 100]), UINT64),
                num_heldout_samples=st.one_of(st.sampled_from([10, 20]), UINT64),
                dataset=one_of_known([DATASET, "fmnist", ""]), client_version=texts)),
            st.tuples(st.just("fetch"), st.builds(pb.FetchTaskRequest, run_id=one_of_known([target.run_id]),
                                                  client_id=one_of_known(target.client_ids)))),
    }


def attack(channel: grpc.Channel, stub, target: Target, budgets: dict[str, int], check=lambda: None) -> None:
    """Run every attack family for its number of examples; ``check()`` after each call."""
    for family, strategy in fuzz_actions(target).items():
        @given(action=strategy)
        @fuzz_settings(budgets[family])
        def run(action):
            perform(channel, stub, target, action)
            check()

        run()


def perform(channel: grpc.Channel, stub, target: Target, action) -> None:
    """Send one fuzzed call; assert it ended with a status the server chose on purpose."""
    kind, request = action
    identity = None  # raw calls: bytes go out as they are
    try:
        if kind == "submit":
            stub.SubmitResult(iter(request), timeout=RPC_TIMEOUT)
        elif kind == "submit_raw":
            channel.stream_unary(f"{SERVICE}/SubmitResult", request_serializer=identity,
                                 response_deserializer=pb.SubmitReply.FromString)(iter(request), timeout=RPC_TIMEOUT)
        elif kind == "register":
            stub.Register(request, timeout=RPC_TIMEOUT)
        elif kind == "register_raw":
            channel.unary_unary(f"{SERVICE}/Register", request_serializer=identity,
                                response_deserializer=pb.RegisterReply.FromString)(request, timeout=RPC_TIMEOUT)
        elif kind == "fetch":
            list(stub.FetchTask(request, timeout=RPC_TIMEOUT))
        elif kind == "fetch_raw":
            list(channel.unary_stream(f"{SERVICE}/FetchTask", request_serializer=identity,
                                      response_deserializer=pb.TaskMessage.FromString)(request, timeout=RPC_TIMEOUT))
        code, details = Code.OK, ""
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
    target.count(kind, code)
    rpc = kind.removesuffix("_raw")
    allowed = {"submit": SUBMIT_CODES, "register": REGISTER_CODES, "fetch": FETCH_CODES}[rpc]
    if kind.endswith("_raw") and unparsable(code, details):
        return
    assert code != Code.UNKNOWN, f"{kind}: unhandled server exception: {details}"
    assert code in allowed, f"{kind}: unexpected {code.name}: {details}"


def perturbed(state, seed: int, scale: float = 0.01):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


# client id -> its current session secret, from the last registration through register() below.
SESSIONS: dict[str, str] = {}


def register(stub, request: pb.RegisterRequest) -> pb.RegisterReply:
    reply = stub.Register(request, timeout=RPC_TIMEOUT)
    SESSIONS[request.client_id] = reply.session_secret
    return reply


def fetch(stub, run_id: str, client_id: str):
    stream = stub.FetchTask(pb.FetchTaskRequest(run_id=run_id, client_id=client_id,
                                                session_secret=SESSIONS[client_id]), timeout=RPC_TIMEOUT)
    messages = list(stream)
    header = messages[0].header
    if not header.HasField("manifest"):
        return header, None
    return header, decode_payload(header.manifest, [m.chunk for m in messages[1:]], max_bytes=1 << 30)


def result(task: pb.TaskHeader, client_id: str, num_samples: int, state=None, **metrics):
    header = pb.ResultHeader(run_id=task.run_id, task_id=task.task_id, client_id=client_id, phase=task.phase,
                             round=task.round, type=task.type, num_samples=num_samples,
                             metrics=metrics or {"loss": 0.5}, session_secret=SESSIONS[client_id])
    chunks: tuple[bytes, ...] = ()
    if state is not None:
        payload = encode_state_dict(state)
        header.manifest.CopyFrom(payload.manifest)
        chunks = payload.chunks
    return header, chunks


def messages_of(header: pb.ResultHeader, chunks) -> list[pb.ResultMessage]:
    return [pb.ResultMessage(header=header)] + [pb.ResultMessage(chunk=pb.Chunk(index=i, data=d))
                                               for i, d in enumerate(chunks)]


@pytest.fixture(scope="module")
def cvae_template():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model("cvae").state_dict().items()}  # 4.3 MB: 5 chunks of 1 MiB


@contextmanager
def fuzzed_server():
    """(coordinator, metrics, channel) of a two-client run served on loopback."""
    coordinator = Coordinator(RUN_ID, expected_clients=2, dataset=DATASET, poll_timeout=0.5)
    metrics = ServerMetrics()
    with loopback_server(coordinator, metrics) as (channel, _port):
        yield coordinator, metrics, channel


@pytest.mark.integration
def test_loopback_server_survives_fuzzed_rpcs(cvae_template):
    template = cvae_template
    with fuzzed_server() as (coordinator, metrics, channel):
        stub = pb_grpc.FederatedLearningStub(channel)
        for cid, (train, heldout) in SAMPLES.items():
            register(stub, pb.RegisterRequest(client_id=cid, num_train_samples=train, num_heldout_samples=heldout,
                                              dataset=DATASET))
        coordinator.wait_for_clients(timeout=5)  # registrations frozen: fuzzed ones cannot change counts

        strategy = FedAvg()
        strategy.begin(template)
        folded = []

        def on_update(task, num_samples, update):
            folded.append((task.client_id, num_samples))
            strategy.accumulate(update, num_samples)

        payload = encode_state_dict(template)
        tasks = [coordinator.new_task(cid, pb.TASK_TYPE_TRAIN, "cvae", 1, TRAIN_SETTINGS, payload) for cid in SAMPLES]
        batch = coordinator.dispatch(tasks, template=template, on_update=on_update)
        header_b, _ = fetch(stub, RUN_ID, "bob")
        # The victim: bob's task, answered with a far-off update that would show in the aggregate.
        victim, victim_chunks = result(header_b, "bob", SAMPLES["bob"][0], perturbed(template, 99, scale=5.0))
        target = Target(RUN_ID, list(SAMPLES), [t.task_id for t in tasks], victim, victim_chunks)

        attack(channel, stub, target, {"mutated results": 200, "random results": 100, "raw bytes": 200,
                                       "register and fetch": 100})
        print("outcomes:", sorted(target.codes.items()))
        # The mutated valid results reached the decoder, and the raw bytes gRPC's parser.
        codes = {code for (_, code) in target.codes}
        assert {"DATA_LOSS", "INVALID_ARGUMENT", "FAILED_PRECONDITION"} <= codes, target.codes
        assert folded == [], "a fuzzed result was accepted"
        assert not batch.wait(0)

        # The server still serves: alice registers again, polls her task and completes it.
        assert register(stub, pb.RegisterRequest(client_id="alice", num_train_samples=100, num_heldout_samples=20,
                                                 dataset=DATASET)).run_id == RUN_ID
        header_a, weights = fetch(stub, RUN_ID, "alice")
        assert header_a.task_id == tasks[0].task_id
        assert all(torch.equal(weights[k], template[k]) for k in template)
        good = perturbed(weights, 1)
        reply = stub.SubmitResult(iter(messages_of(*result(header_a, "alice", 100, good))), timeout=RPC_TIMEOUT)
        assert reply.accepted
        assert folded == [("alice", 100)]
        coordinator.close(batch)

        aggregate = strategy.finish()
        reference = FedAvg()
        reference.begin(template)
        reference.accumulate(good, 100)
        expected = reference.finish()
        assert all(torch.equal(aggregate[k], expected[k]) for k in expected), "a fuzzed update reached the aggregate"
        rejected = sum(metrics.registry.get_sample_value("genfl_client_updates_rejected_total", {"reason": r}) or 0
                       for r in ("malformed", "digest_mismatch", "bad_manifest", "wrong_run", "unknown_task"))
        assert rejected > 0


@pytest.mark.integration
def test_result_aborted_by_an_unparsable_trailing_message_is_not_accepted():
    """A message that does not parse after a valid result: the call is refused as malformed
    (INVALID_ARGUMENT). The result must not count (the client was told it failed), and the server
    must still stop promptly: a handler that returns normally on such a
    call could leave grpc's server.stop() waiting, in about half of the runs, for ever."""
    template = {"w": torch.zeros(4)}
    with fuzzed_server() as (coordinator, _metrics, channel):
        stub = pb_grpc.FederatedLearningStub(channel)
        for cid, (train, heldout) in SAMPLES.items():
            register(stub, pb.RegisterRequest(client_id=cid, num_train_samples=train, num_heldout_samples=heldout,
                                              dataset=DATASET))
        coordinator.wait_for_clients(timeout=5)
        folded = []
        for task_type, update in ((pb.TASK_TYPE_EVALUATE, None), (pb.TASK_TYPE_TRAIN, {"w": torch.ones(4)})):
            settings = TRAIN_SETTINGS if task_type == pb.TASK_TYPE_TRAIN else EVALUATE_SETTINGS
            tasks = [coordinator.new_task(cid, task_type, "cvae", 1, settings, encode_state_dict(template))
                     for cid in SAMPLES]
            batch = coordinator.dispatch(tasks, template=template,
                                         on_update=lambda task, n, upd: folded.append(task.client_id))
            header, _ = fetch(stub, RUN_ID, "alice")
            samples = 100 if task_type == pb.TASK_TYPE_TRAIN else 20
            raw = [m.SerializeToString() for m in messages_of(*result(header, "alice", samples, update))]
            with pytest.raises(grpc.RpcError) as info:
                channel.stream_unary(f"{SERVICE}/SubmitResult", request_serializer=None,
                                     response_deserializer=pb.SubmitReply.FromString)(iter(raw + [GARBAGE]),
                                                                                     timeout=RPC_TIMEOUT)
            assert unparsable(info.value.code(), info.value.details()), info.value.details()
            coordinator.close(batch)
            # The client was told its result failed, so the server must not have used it.
            assert batch.results == {}, f"{pb.TaskType.Name(task_type)} result accepted though the call failed"
        assert folded == []


# -- (c') a real genfl-server process ----------------------------------------------------------------

@pytest.mark.integration
def test_server_process_survives_fuzz_and_completes_its_run(tmp_path, cvae_template):
    out = tmp_path / "run"
    log_path = tmp_path / "server.log"
    server, endpoint = start_server(out, "--clients", "1", "--phase", "cvae", "--rounds", "1", "--address",
                                    "127.0.0.1:0", "--register-timeout", "60", "--local-epochs", "1", log=log_path)
    channel = None
    try:
        address = endpoint["address"]
        channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        grpc.channel_ready_future(channel).result(timeout=20)
        stub = pb_grpc.FederatedLearningStub(channel)

        # A probe client fills the one-client run, so the round starts and hands it a real task.
        probe = pb.RegisterRequest(client_id="probe", num_train_samples=100, num_heldout_samples=20, dataset=DATASET)
        run_id = register(stub, probe).run_id
        task, weights = fetch(stub, run_id, "probe")
        assert task.type == pb.TASK_TYPE_TRAIN and weights is not None
        check_matches_template(weights, cvae_template)
        victim, victim_chunks = result(task, "probe", 100, perturbed(weights, 7, scale=3.0))
        target = Target(run_id, ["probe"], [task.task_id], victim, victim_chunks)

        def alive():
            assert server.poll() is None, "the server died: " + log_path.read_text()[-3000:]

        attack(channel, stub, target, {"mutated results": 60, "random results": 80, "raw bytes": 120,
                                       "register and fetch": 60}, check=alive)
        print("outcomes:", sorted(target.codes.items()))
        assert server.poll() is None, log_path.read_text()[-3000:]
        assert sum(target.codes.values()) >= 300

        # Still up and serving: the probe registers again and completes its run, train then evaluate.
        assert register(stub, probe).run_id == run_id
        again, weights_again = fetch(stub, run_id, "probe")
        assert again.task_id == task.task_id
        assert stub.SubmitResult(iter(messages_of(*result(again, "probe", 100, perturbed(weights_again, 1)))),
                                 timeout=RPC_TIMEOUT).accepted
        evaluation, _ = fetch(stub, run_id, "probe")
        assert evaluation.type == pb.TASK_TYPE_EVALUATE
        assert stub.SubmitResult(iter(messages_of(*result(evaluation, "probe", 20, loss=1.0))),
                                 timeout=RPC_TIMEOUT).accepted
        deadline = time.monotonic() + 60
        while True:
            final, _ = fetch(stub, run_id, "probe")
            if final.type == pb.TASK_TYPE_SHUTDOWN:
                break
            assert final.type == pb.TASK_TYPE_IDLE and time.monotonic() < deadline, final
        assert final.shutdown.outcome == pb.RUN_OUTCOME_COMPLETED
        assert server.wait(60) == 0, log_path.read_text()[-3000:]
        assert [r["round"] for r in run_rounds(out)] == [1]
    finally:
        if channel is not None:
            channel.close()
        if server.poll() is None:
            server.kill()
            server.wait()
