"""Server peak memory while one round aggregates 50 clients.

Starts a real ``genfl-server`` (``--phase cvae --rounds 1 --clients 50 --local-epochs 0``) and 50
lightweight in-benchmark clients that speak the real gRPC protocol over real sockets: Register,
FetchTask (long poll, chunked weights), SubmitResult with the very chunks they received (what a
client with zero local epochs does), then the evaluation task and the shutdown. The clients run as
threads in two helper processes, so the benchmark's own process only measures.

Memory of the server process (from /proc/PID/status):
  * idle: VmRSS once 49 clients are registered and long-polling (before the round: the run starts
    the moment the 50th registers);
  * peak: the larger of VmHWM (reset via /proc/PID/clear_refs = 5 just before the 50th client
    registers) and a 5 ms VmRSS poll, up to the moment the round's record reaches metrics.jsonl.
Reported: (peak - idle) / model size; target < 3x the CVAE's 4.29 MB.
"""

from __future__ import annotations

import multiprocessing as mp
import shlex
import threading
import time
from pathlib import Path

import click

import _common as c
from genfl_shared.runfiles import METRICS_JSONL, round_events, wait_for_endpoint

TARGET_MODELS = 3.0


# -- fake clients (run in helper processes) ------------------------------------------------------
def _fake_client(address: str, cid: str, n_train: int, n_heldout: int, gate, registered, errors,
                 downloaded, submit_gate) -> None:
    import grpc

    from genfl_shared.codec import MAX_MESSAGE_BYTES
    from genfl_shared.proto import genfl_pb2 as pb
    from genfl_shared.proto import genfl_pb2_grpc as pb_grpc

    try:
        if gate is not None:
            gate.wait()
        channel = grpc.insecure_channel(address, [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        stub = pb_grpc.FederatedLearningStub(channel)
        reply = stub.Register(pb.RegisterRequest(client_id=cid, num_train_samples=n_train,
                                                 num_heldout_samples=n_heldout, dataset="",
                                                 client_version="bench"), timeout=60)
        with registered.get_lock():
            registered.value += 1
        while True:
            stream = stub.FetchTask(pb.FetchTaskRequest(run_id=reply.run_id, client_id=cid,
                                                        session_secret=reply.session_secret), timeout=300)
            header = next(stream).header
            if header.type == pb.TASK_TYPE_IDLE:
                continue
            if header.type == pb.TASK_TYPE_SHUTDOWN:
                break
            chunks = [message.chunk.data for message in stream]
            if header.type == pb.TASK_TYPE_TRAIN and submit_gate is not None:
                # --split: every client holds its download until all have one (attribution).
                with downloaded.get_lock():
                    downloaded.value += 1
                submit_gate.wait()
            result = pb.ResultHeader(run_id=header.run_id, task_id=header.task_id, client_id=cid,
                                     phase=header.phase, round=header.round, type=header.type,
                                     metrics={"loss": 1.0}, session_secret=reply.session_secret)
            if header.type == pb.TASK_TYPE_TRAIN:
                result.num_samples = n_train
                result.manifest.CopyFrom(header.manifest)
            else:
                result.num_samples = n_heldout
                chunks = []

            def messages(result=result, chunks=chunks):
                yield pb.ResultMessage(header=result)
                for index, data in enumerate(chunks):
                    yield pb.ResultMessage(chunk=pb.Chunk(index=index, data=data))

            stub.SubmitResult(messages(), timeout=300)
        channel.close()
    except Exception as error:  # reported by the parent
        errors.put(f"{cid}: {type(error).__name__}: {error}")


def _client_worker(address: str, ids: list[int], gated: set[int], gate, registered, errors, downloaded,
                   submit_gate) -> None:
    threads = []
    for i in ids:
        threads.append(threading.Thread(
            target=_fake_client, daemon=True,
            args=(address, f"fake-{i:03d}", 900 + 7 * i, 100, gate if i in gated else None, registered, errors,
                  downloaded, submit_gate)))
        threads[-1].start()
    for thread in threads:
        thread.join()


# -- measurement -----------------------------------------------------------------------------------
def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux, needs ptrace rights on it, e.g. root)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError as error:
        c.log.warning("cannot reset VmHWM (%s); the peak comes from the 5 ms VmRSS poll alone", error)
        return False


class RssPoller(threading.Thread):
    """Samples VmRSS every ``interval`` s until stopped; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.005):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, KeyError):
                return
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure_once(clients: int, work: Path, procs: c.ProcessGroup, split: bool = False,
                 server_args: tuple[str, ...] = ()) -> dict:
    out = work / "server"
    server = procs.start("server", [c.tool("genfl-server"), "--phase", "cvae", "--rounds", "1",
                                    "--clients", str(clients), "--local-epochs", "0",
                                    "--address", "127.0.0.1:0", "--out", str(out), "--threads", "1",
                                    "--log-level", "warning", *server_args], work / "server.log")
    endpoint = wait_for_endpoint(out, 60, [server])
    ctx = mp.get_context("spawn")
    gate, registered, errors = ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    downloaded, submit_gate = ctx.Value("i", 0), (ctx.Event() if split else None)
    last = clients - 1
    halves = [list(range(0, clients, 2)), list(range(1, clients, 2))]
    workers = [ctx.Process(target=_client_worker, args=(endpoint["address"], ids, {last}, gate, registered, errors,
                                                       downloaded, submit_gate),
                           daemon=True) for ids in halves]
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 120
        while registered.value < clients - 1:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"only {registered.value} clients registered\n{c.tail(work / 'server.log')}")
            time.sleep(0.02)
        time.sleep(1.0)  # let the server settle (gRPC threads, long polls) before the idle reading
        idle_samples = []
        for _ in range(20):
            idle_samples.append(_status_kb(server.pid, "VmRSS"))
            time.sleep(0.01)
        idle_kb = c.median(idle_samples)
        hwm_ok = _reset_hwm(server.pid)
        poller = RssPoller(server.pid)
        poller.start()
        started = time.perf_counter()
        gate.set()  # the 50th client registers: the round starts
        metrics = out / METRICS_JSONL
        deadline = time.monotonic() + 120
        broadcast_kb = None
        if split:
            while downloaded.value < clients:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the broadcast did not finish\n{c.tail(work / 'server.log')}")
                time.sleep(0.005)
            time.sleep(0.2)
            broadcast_kb = _status_kb(server.pid, "VmHWM")
            after_broadcast_kb = _status_kb(server.pid, "VmRSS")
            hwm_ok = _reset_hwm(server.pid) and hwm_ok
            submit_gate.set()
        while not round_events(metrics):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the round did not finish\n{c.tail(work / 'server.log')}")
            time.sleep(0.005)
        round_kb_hwm = _status_kb(server.pid, "VmHWM") if hwm_ok else 0
        poller.stop()
        round_wall = time.perf_counter() - started
        record = round_events(metrics)[0]
        c.wait_all([server], 60, "the server")
        for worker in workers:
            worker.join(30)
        problems = []
        while not errors.empty():
            problems.append(errors.get())
        if problems or server.returncode != 0:
            raise RuntimeError(f"server exit {server.returncode}; client errors: {problems[:5]}\n"
                               f"{c.tail(work / 'server.log')}")
        return {"idle_kb": idle_kb, "peak_kb": max(round_kb_hwm, poller.peak_kb, broadcast_kb or 0),
                "hwm_kb": round_kb_hwm, "poll_kb": poller.peak_kb, "poll_samples": poller.samples,
                "round_seconds": record["seconds"], "round_wall": round_wall, "broadcast_kb": broadcast_kb,
                "after_broadcast_kb": after_broadcast_kb if split else None}
    finally:
        gate.set()
        if submit_gate is not None:
            submit_gate.set()
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(5)


@click.command(context_settings={"show_default": True})
@click.option("--clients", type=click.IntRange(2), default=50)
@click.option("--repeats", type=click.IntRange(1), default=3, help="Independent server runs.")
@click.option("--keep", is_flag=True, help="Keep the temp folder (server logs).")
@click.option("--split", is_flag=True, help="Diagnosis: clients hold their uploads until every client has "
              "downloaded, so the broadcast's peak and the upload/aggregation peak are reported apart.")
@click.option("--server-args", default="", help="More genfl-server options, one string (shell-split), e.g. "
              "'--max-concurrent-uploads 4'.")
@click.option("-v", "--verbose", is_flag=True)
def main(clients: int, repeats: int, keep: bool, split: bool, server_args: str, verbose: bool) -> None:
    """Peak server memory above idle during one FedAvg round of CLIENTS fake clients, in CVAE sizes."""
    from genfl_shared.codec import state_dict_nbytes
    from genfl_shared.models import build_model

    c.setup_logging(verbose)
    print(c.machine_line())
    if server_args:
        print(f"server options: {server_args}")
    model_bytes = state_dict_nbytes(build_model("cvae").state_dict())
    runs = []
    with c.temp_dir("genfl-bench-mem-", keep) as tmp:
        for rep in range(repeats):
            with c.ProcessGroup() as procs:
                run = measure_once(clients, tmp / f"run{rep}", procs, split, tuple(shlex.split(server_args)))
            runs.append(run)
            delta = (run["peak_kb"] - run["idle_kb"]) * 1024
            print(f"  run {rep}: idle {run['idle_kb'] / 1024:.1f} MiB, peak {run['peak_kb'] / 1024:.1f} MiB "
                  f"(VmHWM {run['hwm_kb'] / 1024:.1f}, 5 ms poll {run['poll_kb'] / 1024:.1f} over "
                  f"{run['poll_samples']} samples), delta {delta / c.MB:.1f} MB = {delta / model_bytes:.2f} models; "
                  f"round {run['round_seconds']:.2f} s", flush=True)
            if split:
                print(f"    split: broadcast peak {run['broadcast_kb'] / 1024:.1f} MiB "
                      f"(+{(run['broadcast_kb'] - run['idle_kb']) * 1024 / model_bytes:.1f} models), RSS after "
                      f"broadcast {run['after_broadcast_kb'] / 1024:.1f} MiB, upload+aggregation+evaluation peak "
                      f"(VmHWM reset after the broadcast) {run['hwm_kb'] / 1024:.1f} MiB", flush=True)
    idle = c.median([r["idle_kb"] for r in runs]) * 1024
    peak = c.median([r["peak_kb"] for r in runs]) * 1024
    deltas = [(r["peak_kb"] - r["idle_kb"]) * 1024 for r in runs]
    c.result(f"server idle RSS, {clients} clients registered", idle / c.MB, "MB")
    c.result("server peak RSS during the round", peak / c.MB, "MB")
    c.result("peak - idle", c.median(deltas) / c.MB, "MB")
    c.result(f"(peak - idle) / model ({model_bytes / c.MB:.2f} MB), {clients} clients",
             c.median(deltas) / model_bytes, "x model", target=TARGET_MODELS,
             extra=f"runs: {', '.join(f'{d / model_bytes:.2f}' for d in deltas)}")
    c.result(f"round time, {clients} echo clients (server record)", c.median([r["round_seconds"] for r in runs]), "s")


if __name__ == "__main__":
    main()
