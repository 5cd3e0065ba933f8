"""Resource safety of the server's transport, each against a real ``genfl-server`` process with a
hand-made hostile client (raw stubs) beside honest protocol-speaking echo clients:

- two stalled uploads (a valid header and manifest, then nothing) do not block the other clients'
  uploads, and are cut at --upload-timeout (DEADLINE_EXCEEDED, ``upload_timeout``), their tasks
  staying open for a retry;
- with 1,000 idle SubmitResult streams open on a few connections, health, Register and FetchTask
  each answer within a second, and the run completes;
- the server's thread count does not grow with the number of waiting (long-polling) clients;
- a second concurrent upload of one client is refused (ALREADY_EXISTS, ``upload_in_progress``),
  and RPCs past the per-connection and per-IP bounds are refused (RESOURCE_EXHAUSTED,
  ``too_many_streams``, ``too_many_streams_per_ip``) with a rate-limited log.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genfl_server.limits import peer_ip
from genfl_shared.codec import MAX_MESSAGE_BYTES, decode_payload, encode_state_dict
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc

from helpers import log_tail, start_server, wait_until

RPC_TIMEOUT = 60.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # Each channel its own TCP connection (gRPC would otherwise share one between channels).
                   ("grpc.use_local_subchannel_pool", 1)]
TRAIN_SAMPLES, HELDOUT_SAMPLES = 100, 20


# -- a real server --------------------------------------------------------------------------------

class Server:
    """A real genfl-server process (--phase cvae, one round) with /metrics."""

    def __init__(self, tmp_path: Path, *args: str):
        self.out = tmp_path / "run"
        self.log = tmp_path / "server.log"
        self.proc, endpoint = start_server(self.out, "--phase", "cvae", "--rounds", "1", "--local-epochs", "1",
                                           "--address", "127.0.0.1:0", "--metrics-port", "0",
                                           "--register-timeout", "120", *args, log=self.log, timeout=120)
        self.address = endpoint["address"]
        self.metrics_port = endpoint["metrics_port"]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def rejected(self, reason: str) -> float:
        return self.metric("genfl_client_updates_rejected_total", reason=reason)

    def threads(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))

    def details(self) -> str:
        return log_tail(self.log)

    def finish(self, timeout: float = 120) -> None:
        """The run must end by itself, successfully."""
        try:
            code = self.proc.wait(timeout)
        except Exception:
            raise AssertionError(f"the server did not finish within {timeout:.0f} s\n{self.details()}") from None
        assert code == 0, self.details()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def server(tmp_path: Path, *args: str):
    s = Server(tmp_path, *args)
    try:
        yield s
    finally:
        s.kill()


def channel_to(address: str) -> grpc.Channel:
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


# -- protocol-speaking clients ---------------------------------------------------------------------

class EchoClient:
    """An honest client over raw stubs: registers, and answers each task with the weights it got
    (nudged a little, as training would)."""

    def __init__(self, address: str, client_id: str):
        self.client_id = client_id
        self.channel = channel_to(address)
        self.stub = pb_grpc.FederatedLearningStub(self.channel)
        self.run_id = self.secret = ""

    def register(self) -> None:
        reply = self.stub.Register(pb.RegisterRequest(client_id=self.client_id, num_train_samples=TRAIN_SAMPLES,
                                                      num_heldout_samples=HELDOUT_SAMPLES), timeout=RPC_TIMEOUT)
        self.run_id, self.secret = reply.run_id, reply.session_secret

    def fetch(self, timeout: float = RPC_TIMEOUT) -> tuple[pb.TaskHeader, dict | None]:
        """One poll: (task header, its weights or None)."""
        messages = list(self.stub.FetchTask(pb.FetchTaskRequest(run_id=self.run_id, client_id=self.client_id,
                                                                session_secret=self.secret), timeout=timeout))
        header = messages[0].header
        if not header.HasField("manifest"):
            return header, None
        return header, decode_payload(header.manifest, [m.chunk for m in messages[1:]], max_bytes=1 << 30)

    def first_message(self) -> pb.TaskMessage:
        """A poll's first message (its task header); the rest of the call is cancelled."""
        call = self.stub.FetchTask(pb.FetchTaskRequest(run_id=self.run_id, client_id=self.client_id,
                                                       session_secret=self.secret), timeout=RPC_TIMEOUT)
        try:
            return next(call)
        finally:
            call.cancel()

    def next_task(self, timeout: float = 120) -> tuple[pb.TaskHeader, dict | None]:
        """Poll until a task (or the shutdown) comes."""
        deadline = time.monotonic() + timeout
        while True:
            header, weights = self.fetch()
            if header.type != pb.TASK_TYPE_IDLE:
                return header, weights
            assert time.monotonic() < deadline, f"{self.client_id} got no task within {timeout:.0f} s"

    def result_header(self, task: pb.TaskHeader, payload=None) -> pb.ResultHeader:
        samples = TRAIN_SAMPLES if task.type == pb.TASK_TYPE_TRAIN else HELDOUT_SAMPLES
        header = pb.ResultHeader(run_id=task.run_id, task_id=task.task_id, client_id=self.client_id,
                                 phase=task.phase, round=task.round, type=task.type, num_samples=samples,
                                 metrics={"loss": 0.5}, session_secret=self.secret)
        if payload is not None:
            header.manifest.CopyFrom(payload.manifest)
        return header

    def answer(self, task: pb.TaskHeader, weights: dict | None) -> pb.SubmitReply:
        payload = None
        if task.type == pb.TASK_TYPE_TRAIN:
            generator = torch.Generator().manual_seed(hash(self.client_id) % 2**31)
            payload = encode_state_dict({k: v + 1e-3 * torch.randn(v.shape, generator=generator) if v.is_floating_point()
                                         else v for k, v in weights.items()})
        messages = [pb.ResultMessage(header=self.result_header(task, payload))]
        messages += [pb.ResultMessage(chunk=pb.Chunk(index=i, data=d)) for i, d in enumerate(payload.chunks if payload else ())]
        return self.stub.SubmitResult(iter(messages), timeout=RPC_TIMEOUT)

    def serve_until_shutdown(self, timeout: float = 120) -> int:
        """Answer every task until the run ends; returns the run's outcome (a pb.RunOutcome)."""
        while True:
            task, weights = self.next_task(timeout)
            if task.type == pb.TASK_TYPE_SHUTDOWN:
                return task.shutdown.outcome
            assert self.answer(task, weights).accepted

    def close(self) -> None:
        self.channel.close()


class StalledUpload:
    """A hostile SubmitResult: the given messages, then nothing, until released (or cut by the server)."""

    def __init__(self, stub, messages: list[pb.ResultMessage]):
        self._release = threading.Event()

        def stream():
            yield from messages
            self._release.wait()

        self.future = stub.SubmitResult.future(stream(), timeout=RPC_TIMEOUT * 3)

    def code(self, timeout: float) -> grpc.StatusCode:
        try:
            self.future.result(timeout)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def release(self) -> None:
        self._release.set()
        self.future.cancel()


def check_health(address: str, timeout: float = 1.0) -> float:
    """Seconds a health Check took (it must answer SERVING within ``timeout``)."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        start = time.monotonic()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return time.monotonic() - start


def timed(call) -> tuple[float, object]:
    start = time.monotonic()
    value = call()
    return time.monotonic() - start, value


# -- finding 5: stalled uploads --------------------------------------------------------------------

UPLOAD_TIMEOUT = 10.0


@pytest.mark.integration
def test_two_stalled_uploads_do_not_block_other_uploads_and_are_cut_at_the_upload_timeout(tmp_path):
    with server(tmp_path, "--clients", "4", "--upload-timeout", str(UPLOAD_TIMEOUT)) as s:
        honest = [EchoClient(s.address, f"honest-{i}") for i in range(2)]
        hostile = [EchoClient(s.address, f"stall-{i}") for i in range(2)]
        try:
            for client in honest + hostile:
                client.register()
            # The hostile clients take their training tasks, send a valid header and manifest, then nothing.
            stalls = []
            for client in hostile:
                task, weights = client.next_task()
                assert task.type == pb.TASK_TYPE_TRAIN
                header = client.result_header(task, encode_state_dict(weights))
                stalls.append(StalledUpload(client.stub, [pb.ResultMessage(header=header)]))
            stalled_at = time.monotonic()
            wait_until(lambda: s.metric("genfl_rpcs_open") >= 2, 20, "the stalled uploads to be open",
                       details=s.details)

            # Both honest uploads (4.3 MB each) go through while the stalls hold their streams open.
            for client in honest:
                task, weights = client.next_task()
                assert client.answer(task, weights).accepted
            assert all(not stall.future.done() for stall in stalls), "the stalls ended before the honest uploads"
            assert time.monotonic() - stalled_at < UPLOAD_TIMEOUT

            # The stalls are cut at the upload timeout, counted, and their tasks stay open.
            for stall in stalls:
                assert stall.code(UPLOAD_TIMEOUT + 30) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - stalled_at >= UPLOAD_TIMEOUT - 1
            assert s.rejected("upload_timeout") == 2
            assert s.metric("genfl_client_updates_accepted_total", phase="cvae", type="TASK_TYPE_TRAIN") == 2

            # The same clients retry honestly (their task is handed out again) and the run completes.
            with ThreadPoolExecutor(4) as pool:
                statuses = list(pool.map(lambda c: c.serve_until_shutdown(), honest + hostile))
            assert all(status == pb.RUN_OUTCOME_COMPLETED for status in statuses), statuses
            s.finish()
            assert "rejected (upload_timeout)" in s.log.read_text()
        finally:
            for client in honest + hostile:
                client.close()


@pytest.mark.integration
@pytest.mark.parametrize("slots", [1, 2])
def test_a_stall_that_sent_a_chunk_holds_one_of_max_concurrent_uploads_slots(tmp_path, slots):
    """A stall past its first chunk holds a receive slot until --upload-timeout: with one slot it
    holds every other upload up that long, with two the honest upload goes through beside it."""
    with server(tmp_path, "--clients", "2", "--upload-timeout", str(UPLOAD_TIMEOUT),
                "--max-concurrent-uploads", str(slots)) as s:
        honest, hostile = EchoClient(s.address, "honest"), EchoClient(s.address, "stall")
        try:
            honest.register()
            hostile.register()
            task, weights = hostile.next_task()
            payload = encode_state_dict(weights)
            stall = StalledUpload(hostile.stub, [pb.ResultMessage(header=hostile.result_header(task, payload)),
                                                 pb.ResultMessage(chunk=pb.Chunk(index=0, data=payload.chunks[0]))])
            stalled_at = time.monotonic()
            wait_until(lambda: s.metric("genfl_rpcs_open") >= 1, 20, "the stalled upload to be open", details=s.details)
            time.sleep(1.0)  # its first chunk read and its slot taken

            task, weights = honest.next_task()
            assert honest.answer(task, weights).accepted
            honest_took = time.monotonic() - stalled_at
            if slots == 1:
                assert honest_took >= UPLOAD_TIMEOUT - 1, f"the upload went through the only slot in {honest_took:.1f} s"
                assert stall.code(30) == grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                assert honest_took < UPLOAD_TIMEOUT - 1, f"the upload waited {honest_took:.1f} s beside one stall"
                assert not stall.future.done()
                assert stall.code(UPLOAD_TIMEOUT + 30) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert s.rejected("upload_timeout") == 1
        finally:
            honest.close()
            hostile.close()


# -- finding 6: idle streams -----------------------------------------------------------------------

IDLE_STREAMS, IDLE_CONNECTIONS = 1000, 4


class IdleStreams:
    """``count`` SubmitResult streams that send nothing, over ``connections`` connections, held
    open by an asyncio loop of their own until closed."""

    def __init__(self, address: str, count: int, connections: int):
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.outcome: Future = asyncio.run_coroutine_threadsafe(self._hold(address, count, connections), self._loop)

    async def _hold(self, address: str, count: int, connections: int) -> dict[str, int]:
        channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(connections)]
        stop = self._stop

        async def nothing():
            await stop.wait()
            return
            yield  # an async generator that yields nothing

        async def one(channel):
            call = pb_grpc.FederatedLearningStub(channel).SubmitResult(nothing(), timeout=600)
            try:
                await call
                return "OK"
            except grpc.aio.AioRpcError as error:
                return error.code().name
            except asyncio.CancelledError:
                return "CANCELLED"

        try:
            calls = [asyncio.ensure_future(one(channels[i % connections])) for i in range(count)]
            await stop.wait()
            for call in calls:
                call.cancel()
            codes = await asyncio.gather(*calls, return_exceptions=True)
            return {code: codes.count(code) for code in set(map(str, codes))}
        finally:
            for channel in channels:
                await channel.close()

    def close(self) -> dict[str, int]:
        self._loop.call_soon_threadsafe(self._stop.set)
        try:
            return self.outcome.result(60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@pytest.mark.integration
def test_a_thousand_idle_streams_do_not_starve_health_register_or_fetch(tmp_path):
    with server(tmp_path, "--clients", "2", "--upload-timeout", "600",
                "--max-streams-per-connection", str(IDLE_STREAMS)) as s:
        idle = IdleStreams(s.address, IDLE_STREAMS, IDLE_CONNECTIONS)
        clients = []
        try:
            wait_until(lambda: s.metric("genfl_rpcs_open") >= IDLE_STREAMS, 120,
                       f"{IDLE_STREAMS} idle streams to be open", details=s.details)
            assert s.threads() < 100, "the server holds a thread per idle stream"
            assert check_health(s.address) < 1.0
            clients = [EchoClient(s.address, f"honest-{i}") for i in range(2)]
            for client in clients:
                seconds, _ = timed(client.register)
                assert seconds < 1.0, f"Register took {seconds:.2f} s"
            for client in clients:
                task, weights = client.next_task()
                assert task.type == pb.TASK_TYPE_TRAIN, task
                # A task is handed out again until answered: a poll now answers with it at once.
                seconds, again = timed(lambda: client.first_message())
                assert again.header.task_id == task.task_id
                assert seconds < 1.0, f"FetchTask took {seconds:.2f} s"
                assert client.answer(task, weights).accepted
            assert s.metric("genfl_rpcs_open") >= IDLE_STREAMS, "the idle streams were dropped"
            assert check_health(s.address) < 1.0
            with ThreadPoolExecutor(2) as pool:
                statuses = list(pool.map(lambda c: c.serve_until_shutdown(), clients))
            assert all(status == pb.RUN_OUTCOME_COMPLETED for status in statuses), statuses
            s.finish()
        finally:
            outcome = idle.close()
            for client in clients:
                client.close()
        # The server ended them when it stopped (none was refused or answered while it ran).
        assert sum(outcome.values()) == IDLE_STREAMS and "OK" not in outcome, outcome


# -- threads do not grow with waiting clients ------------------------------------------------------

@pytest.mark.integration
def test_server_thread_count_does_not_grow_with_waiting_clients(tmp_path):
    few, many = 2, 100
    with server(tmp_path, "--clients", str(many + 1)) as s:
        pollers: list[EchoClient] = []
        stop = threading.Event()

        def poll_forever(client: EchoClient):
            while not stop.is_set():
                try:
                    client.fetch(timeout=RPC_TIMEOUT)
                except grpc.RpcError:
                    if not stop.is_set():
                        raise

        def settled_threads(polling: int) -> int:
            wait_until(lambda: s.metric("genfl_clients_connected") == polling, 60, f"{polling} polls waiting",
                       details=s.details)
            time.sleep(2.0)
            return s.threads()

        channels = [channel_to(s.address) for _ in range(4)]
        pool = ThreadPoolExecutor(many)
        try:
            for i in range(many):
                client = EchoClient.__new__(EchoClient)
                client.client_id, client.channel = f"poller-{i:03d}", channels[i % len(channels)]
                client.stub = pb_grpc.FederatedLearningStub(client.channel)
                client.register()
                pollers.append(client)
            futures = [pool.submit(poll_forever, c) for c in pollers[:few]]
            with_few = settled_threads(few)
            futures += [pool.submit(poll_forever, c) for c in pollers[few:]]
            with_many = settled_threads(many)
            assert with_many <= with_few + 4, f"{with_few} threads with {few} waiting clients, {with_many} with {many}"
            assert all(not f.done() for f in futures), [f.exception() for f in futures if f.done()]
        finally:
            stop.set()
            for channel in channels:
                channel.close()
            pool.shutdown(wait=True, cancel_futures=True)


# -- one upload per client, streams per connection and per IP --------------------------------------

@pytest.mark.integration
def test_one_upload_per_client_and_streams_per_connection_and_ip_are_bounded(tmp_path):
    per_connection, per_ip = 4, 6
    with server(tmp_path, "--clients", "1", "--upload-timeout", "120", "--max-streams-per-connection",
                str(per_connection), "--max-streams-per-ip", str(per_ip)) as s:
        client = EchoClient(s.address, "client-0")
        flood = [channel_to(s.address) for _ in range(2)]
        held: list[StalledUpload] = []
        try:
            client.register()
            task, weights = client.next_task()
            assert task.type == pb.TASK_TYPE_TRAIN
            payload = encode_state_dict(weights)
            header = client.result_header(task, payload)

            # One upload per client: a second one while the first is open is refused.
            first = StalledUpload(client.stub, [pb.ResultMessage(header=header),
                                                pb.ResultMessage(chunk=pb.Chunk(index=0, data=payload.chunks[0]))])
            wait_until(lambda: s.metric("genfl_rpcs_open") >= 1, 20, "the first upload to be open", details=s.details)
            second = StalledUpload(client.stub, [pb.ResultMessage(header=header)])
            assert second.code(30) == grpc.StatusCode.ALREADY_EXISTS
            assert s.rejected("upload_in_progress") == 1

            # Per connection: the flood connection holds its bound of idle streams; one more is refused.
            flood_stub = pb_grpc.FederatedLearningStub(flood[0])
            held += [StalledUpload(flood_stub, []) for _ in range(per_connection)]
            wait_until(lambda: s.metric("genfl_rpcs_open") >= 1 + per_connection, 20, "the flood streams to be open",
                       details=s.details)
            refusals = 20
            for _ in range(refusals):
                with pytest.raises(grpc.RpcError) as refused:
                    flood_stub.Register(pb.RegisterRequest(client_id="flood", num_train_samples=1), timeout=30)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-streams-per-connection" in refused.value.details()
            assert s.rejected("too_many_streams") == refusals

            # Per IP (by option): a second connection from the same address gets what is left of the IP's bound.
            other_stub = pb_grpc.FederatedLearningStub(flood[1])
            left = per_ip - per_connection - 1  # the client's own first upload counts too
            held += [StalledUpload(other_stub, []) for _ in range(left)]
            wait_until(lambda: s.metric("genfl_rpcs_open") >= per_ip, 20, "the second connection's streams",
                       details=s.details)
            extra = StalledUpload(other_stub, [])
            assert extra.code(30) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert s.rejected("too_many_streams_per_ip") == 1

            # Repeated refusals are rate-limited in the log; the metrics count every one.
            log_text = s.log.read_text()
            assert 1 <= log_text.count("rejected (too_many_streams)") <= 6, log_text[-3000:]

            # The flood goes away; the client's stalled upload is dropped and its retry is accepted.
            for stream in held:
                stream.release()
            first.release()
            wait_until(lambda: s.metric("genfl_rpcs_open") == 0, 30, "the streams to close", details=s.details)
            assert client.answer(task, weights).accepted
            assert client.serve_until_shutdown() == pb.RUN_OUTCOME_COMPLETED
            s.finish()
        finally:
            for stream in held:
                stream.release()
            client.close()
            for channel in flood:
                channel.close()


@pytest.mark.unit
def test_peer_ip_is_the_address_without_the_port():
    assert peer_ip("ipv4:127.0.0.1:50051") == "ipv4:127.0.0.1"
    assert peer_ip("ipv6:[::1]:50051") == "ipv6:[::1]"
    assert peer_ip("unix:/tmp/genfl.sock") == "unix:/tmp/genfl.sock"
