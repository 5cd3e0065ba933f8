"""Lightweight clients that speak GenFL's real wire protocol, without torch: many of them per process.

Each fake client does what a ``genfl-client`` with zero local epochs does, over its own gRPC
channel (its own TCP connection): Register, then long-poll FetchTask; a TRAIN task's weights are
received and sent straight back as the "update" (the received manifest and chunks, so the digest
and manifest are valid by construction), an EVALUATE task is answered with a loss and no weights,
IDLE polls again, SHUTDOWN ends the client. They run as asyncio tasks on ``grpc.aio`` stubs, so a
process holds hundreds of them with one thread.

Used by ``bench_many_clients.py`` and ``tests/test_many_clients.py``; not part of the product.
``run_clients_in_processes`` spreads the clients over a few spawned processes (one event loop
each) so that the clients' own CPU time is spread over cores too.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing as mp
import traceback
from dataclasses import dataclass, field
from typing import Callable

import grpc

from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.wire import MAX_MESSAGE_BYTES

# What the real client sends as channel options: the message limit (one chunk plus a header).
# A local subchannel pool: without it, every channel of a process with the same target and options
# shares one TCP connection, so 125 clients per process were one connection, over the server's
# --max-streams-per-connection (64), and refused (too_many_streams). Real clients are one
# connection each.
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.use_local_subchannel_pool", 1))


class ProtocolViolation(RuntimeError):
    """The server sent something a real client would refuse (chunks out of order, a bad digest)."""


@dataclass
class ClientStats:
    """What one fake client did; summed over clients by the caller."""

    tasks: dict[str, int] = field(default_factory=dict)  # task type name -> tasks answered
    bytes_received: int = 0  # weight bytes downloaded
    bytes_sent: int = 0  # weight bytes uploaded
    polls: int = 0
    error: str | None = None

    def add(self, other: "ClientStats") -> None:
        for name, count in other.tasks.items():
            self.tasks[name] = self.tasks.get(name, 0) + count
        self.bytes_received += other.bytes_received
        self.bytes_sent += other.bytes_sent
        self.polls += other.polls


async def _download(stream, header: pb.TaskHeader, verify: bool) -> list[bytes]:
    """The task's chunks, in order; with ``verify`` their SHA-256 must match the manifest."""
    chunks: list[bytes] = []
    hasher = hashlib.sha256() if verify else None
    while (message := await stream.read()) is not grpc.aio.EOF:
        if message.WhichOneof("kind") != "chunk" or message.chunk.index != len(chunks):
            raise ProtocolViolation(f"expected chunk {len(chunks)}, got {message}"[:200])
        data = message.chunk.data  # upb copies on every access: read once
        if hasher is not None:
            hasher.update(data)
        chunks.append(data)
    if len(chunks) != header.manifest.num_chunks:
        raise ProtocolViolation(f"got {len(chunks)} of {header.manifest.num_chunks} chunks")
    if hasher is not None and hasher.digest() != header.manifest.sha256:
        raise ProtocolViolation("the downloaded weights do not match the manifest's SHA-256")
    return chunks


def _result_messages(header: pb.ResultHeader, chunks: list[bytes]):
    yield pb.ResultMessage(header=header)
    for index, data in enumerate(chunks):
        yield pb.ResultMessage(chunk=pb.Chunk(index=index, data=data))


async def run_client(address: str, client_id: str, num_train: int, num_heldout: int, *,
                     verify_downloads: bool = False, rpc_timeout: float = 600.0) -> ClientStats:
    """One fake client, from registration to the server's SHUTDOWN; raises on any RPC error, saying
    at which step it came."""
    stats = ClientStats()
    step = ["Register"]
    try:
        return await _serve(address, client_id, num_train, num_heldout, stats, step, verify_downloads, rpc_timeout)
    except (grpc.aio.AioRpcError, ProtocolViolation) as error:
        detail = (f"{error.code().name}: {error.details()}" if isinstance(error, grpc.aio.AioRpcError)
                  else str(error))
        raise ProtocolViolation(f"{step[0]}: {detail}") from error


async def _serve(address: str, client_id: str, num_train: int, num_heldout: int, stats: ClientStats,
                 step: list[str], verify_downloads: bool, rpc_timeout: float) -> ClientStats:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.FederatedLearningStub(channel)
        reply = await stub.Register(pb.RegisterRequest(client_id=client_id, num_train_samples=num_train,
                                                       num_heldout_samples=num_heldout, dataset="",
                                                       client_version="fake"), timeout=rpc_timeout)
        poll = pb.FetchTaskRequest(run_id=reply.run_id, client_id=client_id, session_secret=reply.session_secret)
        while True:
            stats.polls += 1
            step[0] = f"FetchTask (poll {stats.polls})"
            stream = stub.FetchTask(poll, timeout=rpc_timeout)
            first = await stream.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "header":
                raise ProtocolViolation("a task stream must start with its header")
            header = first.header
            if header.type == pb.TASK_TYPE_IDLE:
                continue
            if header.type == pb.TASK_TYPE_SHUTDOWN:
                return stats
            chunks = await _download(stream, header, verify_downloads)
            stats.bytes_received += sum(len(c) for c in chunks)
            result = pb.ResultHeader(run_id=header.run_id, task_id=header.task_id, client_id=client_id,
                                     phase=header.phase, round=header.round, type=header.type,
                                     metrics={"loss": 1.0}, session_secret=reply.session_secret)
            if header.type == pb.TASK_TYPE_TRAIN:
                result.num_samples = num_train
                result.manifest.CopyFrom(header.manifest)  # the echo: same bytes, same digest
                if header.train.evaluate_first:
                    # The previous round's evaluation rides on this TRAIN task: report it too.
                    result.metrics.update(eval_loss=1.0, eval_accuracy=0.5, eval_samples=float(num_heldout))
            else:
                result.num_samples = num_heldout
                chunks = []
            step[0] = f"SubmitResult ({pb.TaskType.Name(header.type)} {header.phase} round {header.round})"
            await stub.SubmitResult(_result_messages(result, chunks), timeout=rpc_timeout)
            stats.bytes_sent += sum(len(c) for c in chunks)
            name = pb.TaskType.Name(header.type)
            stats.tasks[name] = stats.tasks.get(name, 0) + 1


def client_ids(count: int) -> list[str]:
    return [f"fake-{i:04d}" for i in range(count)]


def train_samples(index: int) -> int:
    """Distinct per-client sample counts, so the FedAvg weights are not all equal."""
    return 900 + 7 * (index % 100)


# How long the clients cancelled after a failure get to wind down (close their channels).
CANCEL_WAIT_SECONDS = 10.0


async def run_clients(address: str, indices: list[int], *, verify_downloads: bool = False,
                      report: Callable[[ClientStats], None] = lambda stats: None) -> ClientStats:
    """Clients ``indices`` (of :func:`client_ids`' numbering) concurrently; the summed stats, with
    ``error`` naming the clients that failed. The first failure cancels the others: the server
    would otherwise wait for the failed client until its round deadline, and the caller with it.
    ``report`` gets the stats as soon as they are known, before the cancelled clients wind down
    (which is bounded, but has been seen not to end): a caller waiting on them hears of a failure
    even then."""
    ids = client_ids(max(indices) + 1)
    tasks = {asyncio.create_task(run_client(address, ids[i], train_samples(i), 100,
                                            verify_downloads=verify_downloads)): i for i in indices}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    total = ClientStats()
    failures = []
    for task in sorted(done, key=tasks.get):
        if task.exception() is not None:
            outcome = task.exception()
            failures.append(f"{ids[tasks[task]]}: {type(outcome).__name__}: {str(outcome)[:300]}")
        else:
            total.add(task.result())
    if failures:
        total.error = (f"{len(failures)} of {len(indices)} clients failed ({len(pending)} cancelled after the "
                       "first failure); first: " + "; ".join(failures[:3]))
    report(total)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=CANCEL_WAIT_SECONDS)
    return total


def _process_main(address: str, indices: list[int], verify_downloads: bool, results) -> None:
    reported = []

    def report(stats: ClientStats) -> None:
        results.put(stats)
        reported.append(stats)

    try:
        asyncio.run(run_clients(address, indices, verify_downloads=verify_downloads, report=report))
    except BaseException:  # reported by the parent, which otherwise waits for a result forever
        if not reported:
            results.put(ClientStats(error=traceback.format_exc()))


class ClientProcesses:
    """``count`` fake clients spread over ``processes`` spawned processes; ``join`` sums their stats."""

    def __init__(self, address: str, count: int, processes: int, *, verify_downloads: bool = False):
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        groups = [list(range(p, count, processes)) for p in range(min(processes, count))]
        self._procs = [ctx.Process(target=_process_main, args=(address, group, verify_downloads, self._results),
                                   daemon=True) for group in groups]
        for proc in self._procs:
            proc.start()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def join(self, timeout: float) -> ClientStats:
        """Summed stats of every process (``error`` set if any client failed); raises TimeoutError
        when a process reports nothing within ``timeout``."""
        import queue

        total = ClientStats()
        for _ in self._procs:
            try:
                stats = self._results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"fake client processes did not finish within {timeout:.0f} s") from None
            total.add(stats)
            if stats.error:
                # At once: the other processes' clients cannot finish (the server waits for the
                # failed ones, which hold no Presence stream), so waiting for them would look
                # like a server that hangs.
                total.error = stats.error
                return total
        for proc in self._procs:
            proc.join(10)
        return total

    def stop(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)
