"""Security: TLS, mutual TLS and per-client tokens, with real processes over loopback gRPC.

Certificates are made with the ``openssl`` command line for each test session: a throwaway CA, a
server certificate for 127.0.0.1/localhost and a client certificate signed by it, and an unrelated
CA with a client certificate of its own (which a mutual-TLS server must refuse).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import click
import grpc
import pytest

from conftest import dataset_dir
from helpers import loopback_server, start_server
from genfl_client.cli import _credentials, _read_token
from genfl_server.cli import _security
from genfl_server.coordinator import Coordinator
from genfl_server.metrics import ServerMetrics
from genfl_shared.security import (SecurityError, TokenAuthenticator, bearer_metadata, bearer_token, hash_token,
                                   load_tokens, make_tokens, read_token_file, server_credentials)
from genfl_shared.proto import genfl_pb2 as pb
from genfl_shared.proto import genfl_pb2_grpc as pb_grpc
from genfl_shared.tasks import EvaluateTask

# One CVAE round, one local epoch, on 2 x 180 images: every RPC of a run, in a few seconds.
RUN = ["--phase", "cvae", "--rounds", "1", "--clients", "2", "--local-epochs", "1", "--address", "127.0.0.1:0",
       "--register-timeout", "120"]
GIVE_UP = ["--max-reconnect-seconds", "5"]
PROCESS_TIMEOUT = 120


# -- fixtures -------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem (+ server.pem/key for 127.0.0.1 and localhost, client.pem/key), other-ca.pem (+ rogue.pem/key)."""
    d = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=GenFL test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                                  "basicConstraints=CA:FALSE\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    for name, ca, ext in (("server", "ca", "server.ext"), ("client", "ca", "client.ext"),
                          ("rogue", "other-ca", "client.ext")):
        _openssl("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                 cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-extfile", ext,
                 "-out", f"{name}.pem", cwd=d)
    return d


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    result = subprocess.run([sys.executable, "-m", "genfl_shared.partition_cli", "--dataset", "mnist",
                             "--data-root", str(dataset_dir("mnist")), "--clients", "2", "--iid",
                             "--train-subset", "400", "--seed", "0", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 0, result.stderr
    return out


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GENFL_")}


class Processes:
    """Server and client processes of one test; output to log files; all killed at the end."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, *args: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=_env())
        log.close()
        self.procs[name] = proc
        return proc

    def server(self, *args: str) -> str:
        """Start the server; returns its address once it listens."""
        self.procs["server"], endpoint = start_server(self.dir / "run", *RUN, *args, log=self.dir / "server.log",
                                                      env=_env(), timeout=PROCESS_TIMEOUT)
        return endpoint["address"]

    def client(self, name: str, address: str, shard: Path, *args: str) -> subprocess.Popen:
        return self.start(name, "genfl_client.cli", "--server", address, "--shard", str(shard), "--threads", "1",
                          *args)

    def wait(self, name: str, timeout: float = PROCESS_TIMEOUT) -> int:
        return self.procs[name].wait(timeout)

    def output(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _completed(procs: Processes, *clients: str) -> None:
    """The server and the named clients ran the whole run and exited 0."""
    for name in clients:
        assert procs.wait(name) == 0, f"{name}: {procs.output(name)[-3000:]}"
        assert "server ended run" in procs.output(name)
    assert procs.wait("server") == 0, procs.output("server")[-3000:]
    assert (procs.dir / "run" / "summary.json").exists()


def _failed_cleanly(procs: Processes, name: str, *expected: str, within: float = 60) -> str:
    started = time.monotonic()
    code = procs.wait(name, within)
    output = procs.output(name)
    assert code != 0, output
    assert time.monotonic() - started < within
    assert "Traceback" not in output, output
    for text in expected:
        assert text in output, f"{text!r} not in {name}'s output:\n{output}"
    return output


# -- TLS and mutual TLS, real processes -----------------------------------------------------------

@pytest.mark.integration
def test_tls_run_completes_and_a_plaintext_client_fails_cleanly(procs, pki, shards):
    address = procs.server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    # While the server waits for its clients, a plaintext client cannot even connect; it gives up.
    procs.client("plaintext", address, shards / "client-000.npz", *GIVE_UP)
    output = _failed_cleanly(procs, "plaintext", f"server {address} unreachable", "UNAVAILABLE", "--ca")
    assert "WARNING" in output and "Socket closed" in output  # the user saw why it waited, before it gave up
    assert procs.procs["server"].poll() is None
    for i in range(2):
        procs.client(f"client-{i}", address, shards / f"client-00{i}.npz", "--ca", str(pki / "ca.pem"))
    _completed(procs, "client-0", "client-1")
    assert "(TLS)" in procs.output("server")


@pytest.mark.integration
def test_mutual_tls_with_tokens_run_completes_and_intruders_are_refused(procs, pki, shards, tmp_path):
    """The full setting: mutual TLS and per-client tokens. Clients without a certificate from the
    server's client CA cannot connect; clients with one but a wrong or no token are UNAUTHENTICATED;
    the server stays up and the run with the right clients completes."""
    tokens = tmp_path / "tokens"
    make_tokens(tokens, ["client-000", "client-001"])
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    wrong.chmod(0o600)
    address = procs.server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                           "--client-ca", str(pki / "ca.pem"), "--tokens-file", str(tokens / "tokens.json"))
    ca = ["--ca", str(pki / "ca.pem")]
    cert = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
    shard = [shards / "client-000.npz", shards / "client-001.npz"]
    # The intruders first, all at once, against the server waiting for its clients.
    procs.client("no-cert", address, shard[0], *ca, "--token-file", str(tokens / "client-000.token"), *GIVE_UP)
    procs.client("rogue", address, shard[1], *ca, "--tls-cert", str(pki / "rogue.pem"), "--tls-key",
                 str(pki / "rogue.key"), "--token-file", str(tokens / "client-001.token"), *GIVE_UP)
    procs.client("wrong-token", address, shard[0], *ca, *cert, "--token-file", str(wrong))
    procs.client("no-token", address, shard[1], *ca, *cert)
    for name in ("no-cert", "rogue"):
        _failed_cleanly(procs, name, f"server {address} unreachable", "UNAVAILABLE")
    assert "invalid token for client 'client-000'" in _failed_cleanly(
        procs, "wrong-token", "UNAUTHENTICATED", f"server {address} refused", "--token-file")
    assert "requires a client token" in _failed_cleanly(procs, "no-token", "UNAUTHENTICATED")
    assert procs.procs["server"].poll() is None
    for i in range(2):
        # The certificate names localhost and 127.0.0.1: verifying "localhost" while dialling the IP works.
        token = ["--token-file", str(tokens / f"client-00{i}.token")]
        procs.client(f"client-{i}", address, shard[i], *ca, *cert, *token,
                     *(["--tls-server-name", "localhost"] if i else []))
    _completed(procs, "client-0", "client-1")
    server_log = procs.output("server")
    assert "(mutual TLS, client tokens required)" in server_log
    assert server_log.count("rejected (unauthenticated)") == 2
    for i in range(2):  # no token ever reaches a log
        assert (tokens / f"client-00{i}.token").read_text().strip() not in server_log


# -- tokens, in process ---------------------------------------------------------------------------

@pytest.mark.unit
def test_make_tokens_stores_only_hashes_and_round_trips(tmp_path):
    from click.testing import CliRunner

    from genfl_server.security import cli

    result = CliRunner().invoke(cli, ["make-tokens", "--clients", "3", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "t" / "tokens.json").read_text())
    assert sorted(stored) == ["client-000", "client-001", "client-002"]
    authenticator = TokenAuthenticator.from_file(tmp_path / "t" / "tokens.json")
    raw = (tmp_path / "t" / "tokens.json").read_text()
    for cid in stored:
        path = tmp_path / "t" / f"{cid}.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = _read_token(path)  # what genfl-client reads
        assert len(token) >= 40 and token not in raw
        assert stored[cid] == hash_token(token) and stored[cid].startswith("sha256:")
        assert authenticator.check(cid, token)
        assert not authenticator.check(cid, token + "x") and not authenticator.check(cid, None)
    tokens = {cid: _read_token(tmp_path / "t" / f"{cid}.token") for cid in stored}
    assert len(set(tokens.values())) == 3
    assert not authenticator.check("client-000", tokens["client-001"])  # a token is its client's only
    assert not authenticator.check("client-999", tokens["client-000"])
    # Never overwritten by accident.
    again = CliRunner().invoke(cli, ["make-tokens", "--clients", "3", "--out", str(tmp_path / "t")])
    assert again.exit_code != 0 and "--force" in again.output
    # hash-token gives the entry for a hand-made token.
    hashed = CliRunner().invoke(cli, ["hash-token"], input=tokens["client-002"] + "\n")
    assert hashed.output.strip() == stored["client-002"]


@pytest.mark.unit
@pytest.mark.parametrize("entry", ["s3cret-token", "sha256:" + "ab" * 31, "sha256:" + "AB" * 32, 42, None])
def test_a_tokens_file_with_anything_but_hashes_is_refused(tmp_path, entry):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"client-000": hash_token("fine"), "client-001": entry}))
    with pytest.raises(SecurityError, match="client-001.*not a hash"):
        load_tokens(path)
    with pytest.raises(click.ClickException, match="not a hash"):
        _security(_opts(tokens_file=path))


@pytest.mark.integration
def test_the_documented_entry_point_runs_the_token_tools(tmp_path):
    """README: ``python -m genfl_server.security make-tokens`` / ``hash-token`` (the tools live in
    genfl_shared.security)."""
    made = subprocess.run([sys.executable, "-m", "genfl_server.security", "make-tokens", "--clients", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60, env=_env())
    assert made.returncode == 0, made.stderr
    hashed = subprocess.run([sys.executable, "-m", "genfl_server.security", "hash-token",
                             str(tmp_path / "client-000.token")], capture_output=True, text=True, timeout=60,
                            env=_env())
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == json.loads((tmp_path / "tokens.json").read_text())["client-000"]
    usage = subprocess.run([sys.executable, "-m", "genfl_server.security", "--help"], capture_output=True,
                           text=True, timeout=60, env=_env())
    assert "python -m genfl_server.security" in usage.stdout


@pytest.mark.unit
def test_token_file_round_trips_through_bearer_metadata(tmp_path, caplog):
    path = tmp_path / "client.token"
    path.write_text("s3cret-token\n")
    path.chmod(0o644)
    token = read_token_file(path)
    assert token == "s3cret-token"
    assert "readable by others" in caplog.text  # and chmod 600 silences it
    caplog.clear()
    path.chmod(0o600)
    assert read_token_file(path) == token and "readable by others" not in caplog.text
    assert bearer_token(bearer_metadata(token)) == token
    path.write_text("two tokens\n")
    with pytest.raises(SecurityError, match="must hold one token"):
        read_token_file(path)


@pytest.mark.unit
def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([]) is None and bearer_token(None) is None


@pytest.mark.integration
def test_every_rpc_needs_the_named_clients_token(tmp_path):
    """Register, FetchTask and SubmitResult with a missing, wrong or another client's token:
    UNAUTHENTICATED, counted as reason="unauthenticated"; with the right token, all work."""
    tokens = make_tokens(tmp_path, ["alice", "bob"])
    coordinator = Coordinator("run", expected_clients=2, dataset="mnist", poll_timeout=5)
    metrics = ServerMetrics()
    authenticator = TokenAuthenticator.from_file(tmp_path / "tokens.json")
    with loopback_server(coordinator, metrics, authenticator=authenticator) as (channel, _port):
        stub = pb_grpc.FederatedLearningStub(channel)

        def auth(token):
            return None if token is None else bearer_metadata(token)

        def rejected():
            return metrics.registry.get_sample_value("genfl_client_updates_rejected_total",
                                                     {"reason": "unauthenticated"}) or 0.0

        def refused(call, *args, **kwargs):
            before = rejected()
            with pytest.raises(grpc.RpcError) as info:
                result = call(*args, **kwargs)
                if hasattr(result, "__next__"):
                    next(result)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
            assert rejected() == before + 1
            return info.value.details()

        def register(token):
            return stub.Register(pb.RegisterRequest(client_id="alice", num_train_samples=10, num_heldout_samples=5,
                                                    dataset="mnist"), timeout=10, metadata=auth(token))

        def fetch(token):
            return stub.FetchTask(pb.FetchTaskRequest(run_id="run", client_id="alice",
                                                      session_secret=registered.session_secret), timeout=10,
                                  metadata=auth(token))

        def submit(header, token):
            return stub.SubmitResult(iter([pb.ResultMessage(header=header)]), timeout=10, metadata=auth(token))

        assert "requires a client token" in refused(register, None)
        assert "invalid token for client 'alice'" in refused(register, "guess")
        refused(register, tokens["bob"])
        assert "alice" not in coordinator.clients
        registered = register(tokens["alice"])
        assert registered.run_id == "run"

        task = coordinator.new_task("alice", pb.TASK_TYPE_EVALUATE, "cvae", 1,
                                    EvaluateTask(model="cvae", binarize=True, seed=1), None)
        batch = coordinator.dispatch([task])
        refused(fetch, None)
        refused(fetch, tokens["bob"])
        header = next(fetch(tokens["alice"])).header
        assert header.task_id == task.task_id

        result = pb.ResultHeader(run_id="run", task_id=task.task_id, client_id="alice", phase="cvae", round=1,
                                 type=pb.TASK_TYPE_EVALUATE, num_samples=5, metrics={"loss": 1.0},
                                 session_secret=registered.session_secret)
        refused(submit, result, None)
        refused(submit, result, tokens["bob"])
        assert not batch.results
        assert submit(result, tokens["alice"]).accepted and task.task_id in batch.results


# -- option checks ----------------------------------------------------------------------------------

def _opts(**overrides):
    opts = {"tls_cert": None, "tls_key": None, "client_ca": None, "tokens_file": None}
    opts.update(overrides)
    return opts


@pytest.mark.integration
def test_server_security_options_are_checked(pki):
    assert _security(_opts()) == (None, None)
    credentials, _ = _security(_opts(tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                                     client_ca=pki / "ca.pem"))
    assert isinstance(credentials, grpc.ServerCredentials)
    with pytest.raises(click.UsageError, match="--client-ca .*needs TLS"):
        _security(_opts(client_ca=pki / "ca.pem"))
    with pytest.raises(click.UsageError, match="go together"):
        _security(_opts(tls_cert=pki / "server.pem"))
    with pytest.raises(click.ClickException, match="unusable together"):  # another certificate's key
        _security(_opts(tls_cert=pki / "server.pem", tls_key=pki / "client.key"))
    with pytest.raises(click.ClickException, match="not a PEM file"):
        _security(_opts(tls_cert=pki / "server.pem", tls_key=pki / "server.key", client_ca=pki / "server.ext"))
    with pytest.raises(SecurityError, match="cannot read"):
        server_credentials(pki / "missing.pem", pki / "server.key")


@pytest.mark.integration
def test_client_security_options_are_checked(pki, tmp_path):
    assert _credentials(None, None, None, None) is None
    assert isinstance(_credentials(pki / "ca.pem", None, None, None), grpc.ChannelCredentials)
    assert isinstance(_credentials(pki / "ca.pem", pki / "client.pem", pki / "client.key", "localhost"),
                      grpc.ChannelCredentials)
    with pytest.raises(click.UsageError, match="needs TLS"):
        _credentials(None, None, None, "localhost")
    with pytest.raises(click.UsageError, match="go together"):
        _credentials(pki / "ca.pem", pki / "client.pem", None, None)
    with pytest.raises(click.UsageError, match="unusable together"):
        _credentials(pki / "ca.pem", pki / "client.pem", pki / "rogue.key", None)
    with pytest.raises(click.BadParameter, match="not a PEM file"):
        _credentials(pki / "client.ext", None, None, None)
    empty = tmp_path / "empty.token"
    empty.write_text("  \n")
    with pytest.raises(click.BadParameter, match="one token"):
        _read_token(empty)
