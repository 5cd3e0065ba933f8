"""Static checks of deploy/ (Dockerfile, entry point, compose generator, Kubernetes, Prometheus, Grafana).

No Docker engine or cluster is needed: the files are parsed and cross-checked against the real CLIs
(click commands introspected through pyproject's console scripts), the real metric registries and the
partitioner's shard names; shell snippets run under ``sh`` with stub commands; the health helper runs
for real against a loopback gRPC port.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from genfl_shared.partition import shard_file_name
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_DIR = DEPLOY / "compose"
GENERATOR = COMPOSE_DIR / "generate.py"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "genfl.json"
IMAGE_UID = 10001
# Labels Prometheus attaches to every scraped series (compose's scrape config adds role and client).
TARGET_LABELS = {"job", "instance", "role", "client", "le", "quantile"}


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


generate = _load_module("genfl_deploy_generate", GENERATOR)
genfl_health = _load_module("genfl_deploy_health", DEPLOY / "genfl_health.py")


# ------------------------------------------------------------------------------------------------
# The CLIs, as the image runs them
# ------------------------------------------------------------------------------------------------

def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def script_command(script: str) -> click.Command:
    module, attr = console_scripts()[script].split(":")
    command = getattr(importlib.import_module(module), attr)
    assert isinstance(command, click.Command), f"{script} is not a click command"
    return command


def entrypoint_roles() -> dict[str, str]:
    """role -> command, from deploy/entrypoint.sh's dispatch (``server) exec genfl-server "$@" ;;``)."""
    text = (DEPLOY / "entrypoint.sh").read_text()
    roles = dict(re.findall(r"^\s*([a-z]+)\)\s+exec (genfl-[a-z]+) \"\$@\" ;;", text, re.M))
    assert {"server", "client", "partition"} <= roles.keys(), roles
    return roles


class Cli:
    """Flags and environment variables one command accepts."""

    def __init__(self, name: str, flags: set[str], envvars: set[str], params: dict[str, click.Parameter]):
        self.name, self.flags, self.envvars, self.params = name, flags, envvars, params

    @classmethod
    def from_click(cls, name: str, command: click.Command) -> Cli:
        flags, envvars, params = set(), set(), {}
        for param in command.get_params(click.Context(command)):  # with --help
            if not isinstance(param, click.Option):
                continue
            flags.update(param.opts + param.secondary_opts)
            env = param.envvar
            names = [env] if isinstance(env, str) else list(env or [])
            envvars.update(names)
            for n in names:
                params[n] = param
            for opt in param.opts + param.secondary_opts:
                params[opt] = param
        return cls(name, flags, envvars, params)

    def option_default(self, flag: str):
        return self.params[flag].default


def role_cli(role: str) -> Cli:
    if role == "health":
        parser = genfl_health.build_parser()
        flags = {opt for sub in parser._subparsers._group_actions[0].choices.values()
                 for action in sub._actions for opt in action.option_strings}
        return Cli("genfl-health", flags, set(), {})
    script = entrypoint_roles()[role]
    return Cli.from_click(script, script_command(script))


def generator_cli() -> Cli:
    return Cli.from_click("generate.py", generate.main)


def flags_in(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def assert_env_valid(env: dict[str, str], cli: Cli, where: str) -> None:
    for name in env:
        if name.startswith("GENFL_"):
            assert name in cli.envvars, f"{where}: {name} is not an option of {cli.name}"


def assert_flags_valid(args: list[str], cli: Cli, where: str) -> None:
    for flag in flags_in(args):
        assert flag in cli.flags, f"{where}: {flag} is not an option of {cli.name}"


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.unit
def test_every_cli_option_has_its_genfl_environment_variable():
    """The deployments configure everything through GENFL_<OPTION>; an option without it is unusable there."""
    for role in ("server", "client", "partition"):
        cli = role_cli(role)
        command = script_command(entrypoint_roles()[role])
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                expected = "GENFL_" + param.opts[0].lstrip("-").split("/")[0].upper().replace("-", "_")
                assert expected in cli.envvars, f"{cli.name} {param.opts[0]} has no {expected}"


# ------------------------------------------------------------------------------------------------
# YAML
# ------------------------------------------------------------------------------------------------

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.unit
def test_deploy_has_yaml_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"compose/docker-compose.yml", "compose/prometheus.yml", "k8s/kustomization.yaml",
            "grafana/provisioning/datasources/prometheus.yml",
            "grafana/provisioning/dashboards/genfl.yml"} <= names


@pytest.mark.unit
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


# ------------------------------------------------------------------------------------------------
# Dockerfile and entry point
# ------------------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def dockerfile(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored_by_docker(path: str) -> bool:
    parts = path.rstrip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in dockerignore_patterns():
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(part, pattern)
               for prefix, part in zip(prefixes, parts, strict=True)):
            return True
    return False


def installed_by_dockerfile() -> dict[str, str]:
    """Command name -> repo file, for the files the Dockerfile copies into /usr/local/bin."""
    found = {}
    for rest in dockerfile("COPY"):
        args = [a for a in rest.split() if not a.startswith("--")]
        if args[-1].startswith("/usr/local/bin/"):
            found[args[-1].rsplit("/", 1)[1]] = args[0]
    return found


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The instructions of each stage (FROM first); instructions before the first FROM are dropped."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


@pytest.mark.unit
def test_dockerfile_base_user_ports_entrypoint():
    # The base is a build argument: python:3.11-slim by default, genfl-base:bookworm offline.
    assert "BASE_IMAGE=python:3.11-slim" in dockerfile("ARG")
    assert dockerfile("FROM") == ["${BASE_IMAGE} AS venv", "venv AS wheel", "${BASE_IMAGE}"]
    assert dockerfile("USER")[-1].split(":")[0] == str(IMAGE_UID)
    exposed = {int(p.split("/")[0]) for rest in dockerfile("EXPOSE") for p in rest.split()}
    server = role_cli("server")
    assert port_of(server.option_default("--address")) in exposed
    assert generate.GRPC_PORT in exposed and generate.METRICS_PORT in exposed
    entrypoint = json.loads(dockerfile("ENTRYPOINT")[-1])
    assert entrypoint == ["genfl-entrypoint"]
    assert installed_by_dockerfile()["genfl-entrypoint"] == "deploy/entrypoint.sh"
    assert installed_by_dockerfile()["genfl-health"] == "deploy/genfl_health.py"
    cmd = json.loads(dockerfile("CMD")[-1])
    assert cmd[0] in set(entrypoint_roles()) | {"help"}
    runs = " ".join(dockerfile("RUN"))
    # The pinned set into a venv (Debian's python refuses system-wide installs), then the project's wheel.
    assert "python3 -m venv /opt/genfl" in runs
    assert "/opt/genfl/bin/pip install --require-virtualenv -r /tmp/requirements.txt" in runs
    assert "COPY deploy/requirements.txt /tmp/requirements.txt" in [f"COPY {r}" for r in dockerfile("COPY")]
    assert f"--uid {IMAGE_UID}" in runs


@pytest.mark.unit
def test_dockerfile_final_stage_holds_nothing_of_the_build_host():
    """Package sources are build arguments of the venv stage only; the final stage installs with no index."""
    build, wheel, final = dockerfile_stages()
    assert not [rest for kw, rest in wheel if kw == "ARG"]
    build_args = {rest.split("=")[0] for kw, rest in build if kw == "ARG"}
    assert {"PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"} <= build_args
    assert not [rest for kw, rest in final if kw in ("ARG", "ONBUILD")]
    final_env = " ".join(rest for kw, rest in final if kw == "ENV")
    assert "PIP_" not in final_env and "http" not in final_env
    final_runs = " ".join(rest for kw, rest in final if kw == "RUN")
    assert "pip install --no-index --no-deps" in final_runs and "rm -rf /tmp/wheels" in final_runs
    assert ("COPY", "--from=venv /opt/genfl /opt/genfl") in final
    assert ("COPY", "--from=wheel /wheels /tmp/wheels") in final
    assert "PATH=/opt/genfl/bin:" in final_env


@pytest.mark.unit
def test_image_requirements_pin_every_package_the_project_needs():
    lines = [line.split("#")[0].strip() for line in (DEPLOY / "requirements.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line)
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name) and re.fullmatch(r"[0-9][0-9a-z.+]*", version)
               for name, version in pins.items()), pins
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + ["setuptools"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        assert name in pins, f"deploy/requirements.txt does not pin {name}"
    # The versions the tests run with, as the README's set-up command installs them.
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


@pytest.mark.unit
def test_dockerfile_copies_exist_and_are_in_the_build_context():
    for rest in dockerfile("COPY"):
        if rest.startswith("--from="):  # from the build stage, not from the context
            continue
        sources = [a for a in rest.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored_by_docker(source), f"COPY {source}: excluded by .dockerignore"
    # The build needs the package sources and README (pyproject's readme); .dockerignore keeps the bulk out.
    assert (tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
            in " ".join(dockerfile("COPY")))
    for heavy in (".venv", "runs", ".git", "genfl_server/__pycache__", "tests"):
        assert ignored_by_docker(heavy), f".dockerignore lets {heavy} into the build context"


@pytest.mark.unit
def test_image_commands_are_console_scripts():
    scripts = set(console_scripts())
    extra = set(installed_by_dockerfile())
    for role, command in entrypoint_roles().items():
        assert command in scripts | extra, f"entrypoint role {role} runs {command}: not installed"
    text = (DEPLOY / "Dockerfile").read_text() + (DEPLOY / "entrypoint.sh").read_text()
    # (genfl-NAME:TAG is an image, e.g. genfl-base:bookworm, not a command)
    for name in set(re.findall(r"\bgenfl-[a-z]+\b(?!:)", text)):
        assert name in scripts | extra, f"{name} is neither a console script nor installed by the Dockerfile"


@pytest.mark.unit
def test_dockerfile_documented_commands_use_real_options():
    """``docker run ... genfl:latest ROLE --flag`` lines in the Dockerfile's comments."""
    checked = 0
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        match = re.search(r"genfl:latest\s+([a-z]+)\s*(.*)", line)
        if not match or match.group(1) not in entrypoint_roles():
            continue
        args = shlex.split(match.group(2).split("#")[0])
        assert_flags_valid(args, role_cli(match.group(1)), f"Dockerfile: {line.strip()}")
        checked += 1
    assert checked >= 4


@pytest.fixture()
def stubs(tmp_path):
    """A PATH folder whose genfl-* commands record their argv (and GENFL_SHARD) and exit $STUB_EXIT."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in list(console_scripts()) + ["genfl-health", "genfl-entrypoint"]:
        stub = folder / name
        stub.write_text("#!/bin/sh\n"
                        f'echo "{name} $* shard=${{GENFL_SHARD:-}}" >> "$STUB_LOG"\n'
                        'if [ -n "${STUB_TRAP:-}" ]; then\n'
                        '  trap \'echo "' + name + ' got TERM" >> "$STUB_LOG"; exit 143\' TERM\n'
                        '  echo started >> "$STUB_LOG"; while :; do sleep 0.05; done\n'
                        'fi\n'
                        'exit "${STUB_EXIT:-0}"\n')
        stub.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log), "HOME": str(tmp_path)}
    return env, log


def run_entrypoint(args, env, timeout=10, **extra_env):
    return subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), *args], env={**env, **extra_env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_entrypoint_dispatches_roles(stubs):
    env, log = stubs
    for role, command in entrypoint_roles().items():
        log.write_text("")
        result = run_entrypoint([role, "--flag", "a b"], env, STUB_EXIT="7")
        assert result.returncode == 7, result.stderr
        assert log.read_text().strip() == f"{command} --flag a b shard="
    help_text = run_entrypoint([], env)
    assert help_text.returncode == 0 and "server" in help_text.stdout
    bad = run_entrypoint(["--clients", "3"], env)
    assert bad.returncode == 64 and "role first" in bad.stderr
    assert run_entrypoint(["true"], env).returncode == 0  # anything else runs as a command


@pytest.mark.integration
def test_entrypoint_once_server(stubs, tmp_path):
    env, log = stubs
    out = tmp_path / "out"
    out.mkdir()
    # A failed run exits with its code (the controller restarts it), without idling.
    result = run_entrypoint(["once", "server"], env, STUB_EXIT="1", GENFL_OUT=str(out))
    assert result.returncode == 1 and log.read_text().splitlines() == ["genfl-server  shard="]
    # A completed run idles on the health port taken from GENFL_ADDRESS.
    log.write_text("")
    result = run_entrypoint(["once", "server", "--seed", "1"], env, GENFL_OUT=str(out),
                            GENFL_ADDRESS="0.0.0.0:6123")
    assert result.returncode == 0
    assert log.read_text().splitlines() == ["genfl-server --seed 1 shard=", "genfl-health idle --port 6123 shard="]
    # A restart after a completed run does not start another one.
    (out / "summary.json").write_text("{}")
    log.write_text("")
    result = run_entrypoint(["once", "server"], env, GENFL_OUT=str(out))
    assert log.read_text().splitlines() == ["genfl-health idle --port 50051 shard="]
    assert "complete" in result.stderr
    # A restart after a crash continues the interrupted run.
    (out / "summary.json").unlink()
    (out / "run_state.pt").write_bytes(b"")
    log.write_text("")
    result = run_entrypoint(["once", "server", "--seed", "1"], env, GENFL_OUT=str(out), STUB_EXIT="1")
    assert result.returncode == 1
    assert log.read_text().splitlines() == ["genfl-server --resume --seed 1 shard="]


@pytest.mark.unit
def test_entrypoint_flags_are_real_options():
    """The flags entrypoint.sh passes itself: --resume to genfl-server, --port and the server's TLS
    files to genfl-health idle."""
    text = (DEPLOY / "entrypoint.sh").read_text()
    code = "\n".join(line.split("#")[0] for line in text.split("usage()")[0].splitlines()) + text.split("EOF\n}")[1]
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", code)) - {"--help"}
    assert used == {"--resume", "--port", "--tls-cert", "--tls-key", "--client-ca"}, used
    assert "--resume" in role_cli("server").flags
    assert {"--port", "--tls-cert", "--tls-key", "--client-ca"} <= role_cli("health").flags
    # The TLS files idle serves with are the server's own options (GENFL_TLS_CERT, ...).
    assert {"GENFL_TLS_CERT", "GENFL_TLS_KEY", "GENFL_CLIENT_CA"} <= role_cli("server").envvars


@pytest.mark.integration
def test_entrypoint_once_client_idles_and_forwards_sigterm(stubs):
    env, log = stubs
    proc = subprocess.Popen(["sh", str(DEPLOY / "entrypoint.sh"), "once", "client"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "idling" in proc.stderr.readline()  # the client completed; the container stays up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
    # SIGTERM while the client runs reaches the client, whose exit code is the container's.
    log.write_text("")
    proc = subprocess.Popen(["sh", str(DEPLOY / "entrypoint.sh"), "once", "client"],
                            env={**env, "STUB_TRAP": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while "started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 143
        assert "genfl-client got TERM" in log.read_text()
    finally:
        proc.kill()


@pytest.mark.integration
def test_health_helper_probe_and_idle():
    """The compose healthcheck's probe, against the idle responder the Kubernetes server runs after its run."""
    port = free_port()
    tool = [sys.executable, str(DEPLOY / "genfl_health.py")]
    idle = subprocess.Popen([*tool, "idle", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        assert "idle" in idle.stderr.readline()
        probe = [*tool, "probe", "--address", f"127.0.0.1:{port}", "--timeout", "5"]
        alive = subprocess.run(probe, capture_output=True, text=True, timeout=20)
        assert alive.returncode == 0 and "SERVING" in alive.stdout
        ready = subprocess.run([*probe, "--service", genfl_health.SERVICE_NAME], capture_output=True,
                               text=True, timeout=20)
        assert ready.returncode == 1 and "NOT_SERVING" in ready.stdout
        idle.send_signal(signal.SIGTERM)
        assert idle.wait(timeout=10) == 0
    finally:
        idle.kill()
    gone = subprocess.run([*tool, "probe", "--address", f"127.0.0.1:{port}", "--timeout", "1"],
                          capture_output=True, text=True, timeout=20)
    assert gone.returncode == 1


@pytest.fixture(scope="module")
def compose_secrets(tmp_path_factory) -> Path:
    """What generate.py --secure makes for 2 clients."""
    folder = tmp_path_factory.mktemp("compose-secrets") / "secrets"
    assert generate.make_secrets(folder, 2) is True
    assert generate.make_secrets(folder, 2) is False  # complete: kept as it is
    return folder


@pytest.mark.integration
def test_health_helper_speaks_mutual_tls(compose_secrets):
    """With TLS on, the healthcheck still works: the idle responder serves mutual TLS like the server,
    and the probe shows the health certificate; without it, or in plaintext, it is refused."""
    port = free_port()
    tool = [sys.executable, str(DEPLOY / "genfl_health.py")]
    s = compose_secrets
    idle = subprocess.Popen([*tool, "idle", "--port", str(port), "--tls-cert", str(s / "server.pem"),
                             "--tls-key", str(s / "server.key"), "--client-ca", str(s / "ca.pem")],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "idle" in idle.stderr.readline()
        probe = [*tool, "probe", "--address", f"localhost:{port}", "--timeout", "5"]
        with_certificate = [*probe, "--ca", str(s / "ca.pem"), "--tls-cert", str(s / "health.pem"),
                            "--tls-key", str(s / "health.key")]
        alive = subprocess.run(with_certificate, capture_output=True, text=True, timeout=20)
        assert alive.returncode == 0 and "SERVING" in alive.stdout, alive.stderr
        no_client_certificate = subprocess.run([*probe, "--ca", str(s / "ca.pem")], capture_output=True,
                                               text=True, timeout=20)
        assert no_client_certificate.returncode == 1
        plaintext = subprocess.run(probe, capture_output=True, text=True, timeout=20)
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
    finally:
        idle.send_signal(signal.SIGTERM)
        assert idle.wait(timeout=10) == 0


@pytest.mark.unit
def test_health_service_name_matches_the_server():
    from genfl_server import service

    assert genfl_health.SERVICE_NAME == service.SERVICE_NAME


# ------------------------------------------------------------------------------------------------
# docker compose
# ------------------------------------------------------------------------------------------------

def run_generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATOR), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def service_role(service: dict) -> str | None:
    command = service.get("command") or []
    if command[:1] == ["once"]:
        command = command[1:]
    return command[0] if command and command[0] in entrypoint_roles() else None


def service_args(service: dict) -> list[str]:
    command = service.get("command") or []
    return command[2:] if command[:1] == ["once"] else command[1:]


def mounts(service: dict) -> list[tuple[str, str, str]]:
    result = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        result.append((source, target, mode[0] if mode else "rw"))
    return result


def check_compose(compose_file: Path, clients: int, shards_dir: Path) -> None:
    """Everything a compose file from the generator must satisfy, whatever K and paths."""
    compose = yaml.safe_load(compose_file.read_text())
    base = compose_file.parent
    services = compose["services"]
    server = services["server"]
    names = [f"client-{i:03d}" for i in range(clients)]
    assert sorted(n for n in services if n.startswith("client-")) == names

    # Every GENFL_* variable and --flag is a real option of the service's CLI.
    for name, service in services.items():
        role = service_role(service)
        if role is None:
            continue
        cli = role_cli(role)
        assert_env_valid(service.get("environment", {}), cli, f"{compose_file.name}: {name}")
        assert_flags_valid(service_args(service), cli, f"{compose_file.name}: {name}")
    assert service_role(server) == "server"
    env = server["environment"]
    grpc_port = port_of(env["GENFL_ADDRESS"])
    metrics_port = int(env["GENFL_METRICS_PORT"])
    assert int(env["GENFL_CLIENTS"]) == clients
    assert {str(grpc_port), str(metrics_port)} <= set(server["expose"])

    # The healthcheck asks the server's own gRPC port, for the service, with the installed helper.
    test = server["healthcheck"]["test"]
    assert test[:3] == ["CMD", "genfl-health", "probe"]
    assert_flags_valid(test[3:], role_cli("health"), "healthcheck")
    assert port_of(test[test.index("--address") + 1]) == grpc_port
    if "--service" in test:
        assert test[test.index("--service") + 1] in ("", genfl_health.SERVICE_NAME)
    server_mounts = {target: source for source, target, _mode in mounts(server)}
    assert env["GENFL_OUT"] in server_mounts
    assert env["GENFL_PARTITION_INFO"] in server_mounts
    if "GENFL_TEST_DATA" in env:
        assert env["GENFL_TEST_DATA"] in server_mounts
    if "build" in server:
        assert (base / server["build"]["context"]).resolve() == REPO
        assert (REPO / server["build"]["dockerfile"]).is_file()

    for index, name in enumerate(names):
        client = services[name]
        assert service_role(client) == "client" and client["image"] == server["image"]
        cenv = client["environment"]
        host, port = cenv["GENFL_SERVER"].rsplit(":", 1)
        assert host == "server" and int(port) == grpc_port
        assert client["depends_on"] == {"server": {"condition": "service_healthy"}}
        # Exactly one data mount: its own shard, read-only, where GENFL_SHARD points; secrets (--secure)
        # are only its own, read-only too.
        secrets = [(s, t, m) for s, t, m in mounts(client) if t.startswith(generate.SECRETS_MOUNT + "/")]
        [(source, target, mode)] = [m for m in mounts(client) if m not in secrets]
        assert mode == "ro" and target == cenv["GENFL_SHARD"]
        for secret_source, _, secret_mode in secrets:
            assert secret_mode == "ro"
            assert Path(secret_source).name in ("ca.pem", *(f"{name}.{ext}" for ext in ("pem", "key", "token")))
        assert Path(source).name == shard_file_name(index)
        assert (base / source).resolve() == (shards_dir / shard_file_name(index)).resolve()
        assert str(int(cenv["GENFL_METRICS_PORT"])) in client["expose"]

    # Prometheus scrapes the server and every client on their metrics ports.
    prometheus = services["prometheus"]
    [(config_source, config_target, _)] = mounts(prometheus)
    assert config_target == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((base / config_source).read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"server:{metrics_port}"} | {f"{n}:{services[n]['environment']['GENFL_METRICS_PORT']}"
                                             for n in names}
    assert expected <= targets
    assert targets - expected <= {"localhost:9090"}

    # Nothing that docker-compose v1 (1.29) refuses: no top-level name (it is in .env).
    assert set(compose) == {"services", "volumes"}
    assert "COMPOSE_PROJECT_NAME=" in (base / ".env").read_text()

    # Grafana gets the provisioning and the dashboard folder the provider reads.
    if "grafana" not in services:
        return
    grafana = {target: source for source, target, _ in mounts(services["grafana"])}
    assert (base / grafana["/etc/grafana/provisioning"]).resolve() == DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/genfl.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert (base / grafana[dashboards_path]).resolve() == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_path}/{DASHBOARD.name}"


@pytest.mark.integration
def test_compose_generator_five_clients(tmp_path):
    out = tmp_path / "compose" / "docker-compose.yml"
    shards = tmp_path / "shards"
    result = run_generator("--clients", "5", "--shards-dir", str(shards), "--out", str(out), "--dataset", "fmnist",
                           "--rounds", "3", "--test-data", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    check_compose(out, 5, shards)
    services = yaml.safe_load(out.read_text())["services"]
    env = services["server"]["environment"]
    assert env["GENFL_DATASET"] == "fmnist" and env["GENFL_ROUNDS"] == "3"
    assert "GENFL_SHARE_LABEL_COUNTS" not in services["client-000"]["environment"]  # labels stay private
    mixed = tmp_path / "mixed" / "docker-compose.yml"
    result = run_generator("--clients", "2", "--shards-dir", str(shards), "--out", str(mixed),
                           "--server-option", "client-synthetic-mix=0.5")
    assert result.returncode == 0, result.stderr
    clients = [s for name, s in yaml.safe_load(mixed.read_text())["services"].items() if name.startswith("client-")]
    assert len(clients) == 2 and all(c["environment"]["GENFL_SHARE_LABEL_COUNTS"] == "true" for c in clients)


@pytest.mark.integration
def test_compose_generator_secure(tmp_path):
    """--secure: mutual TLS and a token per client; each container gets only its own secrets."""
    from genfl_shared.security import hash_token

    out = tmp_path / "compose" / "docker-compose.yml"
    shards, secrets = tmp_path / "shards", tmp_path / "secrets"
    result = run_generator("--clients", "2", "--shards-dir", str(shards), "--out", str(out), "--secure",
                           "--secrets-dir", str(secrets), "--prometheus-image", "genfl-prometheus:latest",
                           "--no-grafana", "--server-option", "synthetic-samples=200")
    assert result.returncode == 0, result.stderr
    check_compose(out, 2, shards)
    services = yaml.safe_load(out.read_text())["services"]
    assert "grafana" not in services and services["prometheus"]["image"] == "genfl-prometheus:latest"
    server = services["server"]
    env = server["environment"]
    assert env["GENFL_SYNTHETIC_SAMPLES"] == "200"
    mounted = {target: source for source, target, _ in mounts(server)}
    for variable in ("GENFL_TLS_CERT", "GENFL_TLS_KEY", "GENFL_CLIENT_CA", "GENFL_TOKENS_FILE"):
        assert env[variable] in mounted, variable
    test = server["healthcheck"]["test"]
    assert mounted[test[test.index("--tls-cert") + 1]].endswith("/health.pem")
    tokens = json.loads((secrets / "tokens.json").read_text())
    for index in range(2):
        name = f"client-{index:03d}"
        client = services[name]
        cmounts = {target: (out.parent / source).resolve() for source, target, _ in mounts(client)}
        cenv = client["environment"]
        token = cmounts[cenv["GENFL_TOKEN_FILE"]].read_text().strip()
        assert tokens[name] == hash_token(token)
        assert cmounts[cenv["GENFL_TLS_CERT"]] == (secrets / f"{name}.pem").resolve()
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(secrets / "ca.pem"),
                                 str(cmounts[cenv["GENFL_TLS_CERT"]])], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
    names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(secrets / "server.pem")],
                           capture_output=True, text=True, check=True).stdout
    assert "DNS:server" in names and "DNS:localhost" in names
    assert (secrets.stat().st_mode & 0o077) == 0  # nobody else on the host gets in
    if os.geteuid() == 0:  # handed to the image's user, keys readable by it only
        key = secrets / "client-000.key"
        assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (IMAGE_UID, 0o600)


@pytest.mark.integration
def test_compose_file_passes_docker_compose_v1_config(tmp_path):
    """docker-compose v1 (1.29, Debian's) accepts the generated file, secure or not."""
    v1 = shutil.which("docker-compose")
    if v1 is None:
        pytest.skip("docker-compose (v1) is not installed (bash scripts/setup.sh installs it)")
    for secure in ([], ["--secure", "--secrets-dir", str(tmp_path / "secrets")]):
        out = tmp_path / f"compose{len(secure)}" / "docker-compose.yml"
        assert run_generator("--clients", "2", "--shards-dir", str(tmp_path), "--out", str(out),
                             *secure).returncode == 0
        result = subprocess.run([v1, "-f", str(out), "config", "-q"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_compose_generator_refuses_a_mismatched_partition(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "partition.json").write_text(json.dumps({"num_clients": 4, "dataset": "mnist"}))
    result = run_generator("--clients", "5", "--shards-dir", str(shards), "--out", str(tmp_path / "c.yml"))
    assert result.returncode != 0 and "4 clients" in result.stderr


@pytest.mark.integration
def test_committed_compose_example_is_current():
    """deploy/compose/docker-compose.yml (K=3) is what its header's command generates, and valid."""
    compose_file = COMPOSE_DIR / "docker-compose.yml"
    match = re.search(r"^#\s+python deploy/compose/generate\.py (.*)$", compose_file.read_text(), re.M)
    args = shlex.split(match.group(1))
    assert_flags_valid(args, generator_cli(), "compose header")
    result = run_generator(*args, "--check")
    assert result.returncode == 0, result.stderr + result.stdout
    clients = int(args[args.index("--clients") + 1])
    assert clients == 3
    check_compose(compose_file, clients, REPO / args[args.index("--shards-dir") + 1])


@pytest.mark.integration
def test_generated_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package 'prometheus'; .ci/run installs it)"
    out = tmp_path / "docker-compose.yml"
    assert run_generator("--clients", "2", "--out", str(out), "--shards-dir", str(tmp_path)).returncode == 0
    for config in (tmp_path / "prometheus.yml", COMPOSE_DIR / "prometheus.yml"):
        result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.unit
def test_yaml_writer_round_trips():
    tricky = {"no": "no", "yes": "Yes", "time": "1:30", "address": "0.0.0.0:50051", "interp": "${X:-y}",
              "empty": "", "list": [], "map": {}, "nested": [{"a": 1, "b": [1, "2"]}, "s", [3]],
              "octal": "012", "float": "1e3", "tilde": "~", "hash": "#x", "colon": "a: b", "bool": True,
              "none": None, "number": 1.5, "null": "null", "dash": "-x", "star": "*a", "amp": "&a",
              "bang": "!x", "at": "@x", "spaces": "key with spaces", "quote": 'say "hi"', "unicode": "α",
              "long": ["a" * 40, "b" * 40, "c" * 40], "1": "int-like key"}
    assert yaml.safe_load(generate.to_yaml(tricky, "header\nline")) == tricky


@pytest.mark.unit
def test_generator_shard_names_match_the_partitioner():
    for index in (0, 7, 42, 999):
        assert generate.shard_name(index) == shard_file_name(index)


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def k8s_resources() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        path = K8S / resource
        assert path.is_file(), f"kustomization lists {resource}, which does not exist"
        for doc in load_docs(path):
            if doc["kind"] != "Namespace":
                doc["metadata"].setdefault("namespace", kustomization["namespace"])
            docs.append(doc)
    return docs


def k8s_find(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in k8s_resources() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container_script(container: dict) -> str | None:
    command = (container.get("command") or []) + (container.get("args") or [])
    if command[:2] == ["/bin/sh", "-c"]:
        return command[2]
    return None


def container_role(container: dict) -> str | None:
    """The CLI a container runs: ``args: [once, server]``, ``[client]`` or an sh script ending in it."""
    script = container_script(container)
    if script is not None:
        match = re.search(r"genfl-entrypoint (?:once )?([a-z]+)", script)
        return match.group(1) if match else None
    if container.get("command"):
        return None
    args = container.get("args") or []
    if args[:1] == ["once"]:
        args = args[1:]
    return args[0] if args and args[0] in entrypoint_roles() else None


def container_env(container: dict) -> dict[str, str]:
    env = {}
    for ref in container.get("envFrom", []):
        [config_map] = k8s_find("ConfigMap", ref["configMapRef"]["name"])
        env.update(config_map["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    script = container_script(container) or ""
    for name in re.findall(r"\b(GENFL_[A-Z_]+)=", script):
        env[name] = "(script)"
    return env


def named_port(container: dict, name: str) -> int:
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


@pytest.mark.unit
def test_kustomization_resources_are_complete():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_resources()}
    assert {("Namespace", "genfl"), ("Deployment", "genfl-server"), ("Service", "genfl-server"),
            ("StatefulSet", "genfl-client"), ("ConfigMap", "genfl-server-config"),
            ("ConfigMap", "genfl-client-config"), ("PersistentVolumeClaim", "genfl-shards"),
            ("PersistentVolumeClaim", "genfl-out")} <= kinds
    for doc in k8s_resources():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()


@pytest.mark.unit
def test_k8s_genfl_containers_use_real_options_and_consistent_ports():
    [server] = k8s_find("Deployment", "genfl-server")
    [clients] = k8s_find("StatefulSet", "genfl-client")
    [service] = k8s_find("Service", "genfl-server")
    roles = {}
    for workload in (server, clients):
        spec = pod_spec(workload)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID and spec["securityContext"]["runAsNonRoot"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["image"].split(":")[0] == "genfl"
            assert container["resources"]["requests"] and container["resources"]["limits"]
        [container] = spec["containers"]
        role = container_role(container)
        cli = role_cli(role)
        env = container_env(container)
        assert_env_valid(env, cli, f"{workload['kind']} {workload['metadata']['name']}")
        assert_flags_valid(container.get("args", []), cli, workload["metadata"]["name"])
        # Metrics: the flag's port = the container port = the scrape annotation.
        metrics = int(env["GENFL_METRICS_PORT"])
        assert named_port(container, "metrics") == metrics
        assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == metrics
        roles[role] = (container, env)

    container, env = roles["server"]
    grpc_port = port_of(env["GENFL_ADDRESS"])
    assert named_port(container, "grpc") == grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == genfl_health.SERVICE_NAME
    assert container["livenessProbe"]["grpc"].get("service", "") == ""  # alive = the whole server
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > float(env.get("GENFL_LINGER_SECONDS", 0))
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["targetPort"] in ("grpc", grpc_port)
    assert ports["metrics"]["targetPort"] in ("metrics", int(env["GENFL_METRICS_PORT"]))
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["GENFL_OUT"] in mounts
    for key in ("GENFL_TEST_DATA", "GENFL_PARTITION_INFO"):
        assert any(env[key].startswith(m + "/") for m in mounts), key

    _client, client_env = roles["client"]
    host, port = client_env["GENFL_SERVER"].rsplit(":", 1)
    assert host == service["metadata"]["name"] and int(port) == ports["grpc"]["port"]
    assert int(env["GENFL_CLIENTS"]) == clients["spec"]["replicas"]
    assert clients["spec"]["serviceName"] in {d["metadata"]["name"] for d in k8s_find("Service")}


@pytest.mark.unit
def test_k8s_volumes_reference_existing_claims():
    claims = {d["metadata"]["name"] for d in k8s_find("PersistentVolumeClaim")}
    for workload in k8s_find("Deployment") + k8s_find("StatefulSet"):
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.integration
@pytest.mark.parametrize("ordinal", [0, 1, 12, 123])
def test_statefulset_ordinal_selects_its_shard(stubs, ordinal):
    """Run the client container's real shell script for pod genfl-client-N (with a stub entry point)."""
    env, log = stubs
    [clients] = k8s_find("StatefulSet", "genfl-client")
    [container] = pod_spec(clients)["containers"]
    pod_env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in container["env"]
               if "valueFrom" in item}
    assert pod_env == {"POD_NAME": "metadata.name"}
    script = container_script(container)
    result = subprocess.run(["sh", "-c", script], env={**env, "POD_NAME": f"genfl-client-{ordinal}"},
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    call = log.read_text().strip()
    assert call == f"genfl-entrypoint once client shard=/shards/{shard_file_name(ordinal)}"
    shards_mount = [m for m in container["volumeMounts"] if m["mountPath"] == "/shards"]
    assert shards_mount and shards_mount[0]["readOnly"]


# ------------------------------------------------------------------------------------------------
# Prometheus metric names in the Grafana dashboard
# ------------------------------------------------------------------------------------------------

def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, as a live ServerMetrics()/ClientMetrics() registry exposes them."""
    from genfl_client.metrics import ClientMetrics
    from genfl_server.metrics import ServerMetrics

    series: dict[str, set[str]] = {}
    for metrics in (ServerMetrics(), ClientMetrics("x")):
        # Labelled metrics expose nothing until a child exists: make one of each (a client's metrics
        # are already its client_id's children).
        for value in vars(metrics).values():
            labelnames = getattr(value, "_labelnames", ())
            if labelnames and hasattr(value, "labels") and not getattr(value, "_labelvalues", ()):
                value.labels(*["probe"] * len(labelnames))
        for family in metrics.registry.collect():
            for sample in family.samples:
                series.setdefault(sample.name, set()).update(sample.labels)
    return series


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        for inner in panel.get("panels", []):
            exprs += [t["expr"] for t in inner.get("targets", []) if t.get("expr")]
    return exprs


def dashboard_problems(dashboard: dict) -> list[str]:
    """Metric names the registries do not export, and label names no metric in the query has."""
    series = exported_series()
    problems = []
    for expr in dashboard_exprs(dashboard):
        names = set(re.findall(r"\bgenfl_[a-z_]+\b", expr))
        labels_known = set(TARGET_LABELS)
        for name in names:
            if name in series:
                labels_known |= series[name]
            elif not any(name in labels for labels in series.values()):  # e.g. genfl_phase="cvae"
                problems.append(f"{name} (in {expr!r}) is not exported")
        for selector_name, body in re.findall(r"\b(genfl_[a-z_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", body):
                if label not in series.get(selector_name, set()) | TARGET_LABELS:
                    problems.append(f"label {label} of {selector_name} (in {expr!r}) does not exist")
        for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                if label not in labels_known:
                    problems.append(f"label {label} (in {expr!r}) is on no metric of the query")
    return problems


@pytest.mark.unit
def test_dashboard_metrics_are_exported():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 15
    assert dashboard_problems(dashboard) == []


@pytest.mark.unit
def test_dashboard_check_catches_typos():
    dashboard = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard)
    assert "genfl_round_duration_seconds_bucket" in text and "by (reason)" in text
    broken = json.loads(text.replace("genfl_round_duration_seconds_bucket", "genfl_round_durations_seconds_bucket")
                        .replace("by (reason)", "by (reasons)"))
    problems = dashboard_problems(broken)
    assert any("genfl_round_durations_seconds_bucket" in p for p in problems), problems
    assert any("label reasons" in p for p in problems), problems


@pytest.mark.unit
def test_dashboard_panels_and_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    required = ["Phase", "Current round", "Weighted client accuracy per phase", "Test accuracy", "Train loss",
                "CAS and federated CAS", "Clients registered / connected", "Model bytes sent / received",
                "Updates rejected by reason", "Round duration"]
    for title in required:
        assert title in panels, f"dashboard lacks the panel {title!r}"

    def exprs(title):
        return " ".join(t["expr"] for t in panels[title]["targets"])

    assert "genfl_phase" in exprs("Phase") and "genfl_round" in exprs("Current round")
    assert "genfl_cas_accuracy" in exprs("CAS and federated CAS")
    assert "genfl_cas_federated_accuracy" in exprs("CAS and federated CAS")
    assert "genfl_clients_registered" in exprs("Clients registered / connected")
    assert "genfl_clients_connected" in exprs("Clients registered / connected")
    assert "rate(genfl_sent_bytes_total" in exprs("Model bytes sent / received")
    assert "rate(genfl_received_bytes_total" in exprs("Model bytes sent / received")
    assert "genfl_client_updates_rejected_total" in exprs("Updates rejected by reason")
    duration = exprs("Round duration")
    assert "histogram_quantile" in duration and "_sum" in duration and "_count" in duration
    assert "genfl_weighted_client_accuracy" in exprs("Weighted client accuracy per phase")

    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == generate.DATASOURCE_UID
    # The URL reaches compose's prometheus service on Prometheus' default port.
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


# ------------------------------------------------------------------------------------------------
# deploy/README.md: the documented commands use real options
# ------------------------------------------------------------------------------------------------

def readme_commands() -> list[list[str]]:
    text = (DEPLOY / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                for part in re.split(r"\s*(?:&&|\|)\s*", line):
                    try:
                        commands.append(shlex.split(part))
                    except ValueError:
                        pass
    return commands


@pytest.mark.unit
def test_readme_commands_use_real_options():
    checked = 0
    for words in readme_commands():
        for i, word in enumerate(words):
            if word in console_scripts():
                cli = Cli.from_click(word, script_command(word))
            elif word.endswith("deploy/compose/generate.py"):
                cli = generator_cli()
            elif word.startswith("genfl:") and i + 1 < len(words) and words[i + 1] in entrypoint_roles():
                cli, i = role_cli(words[i + 1]), i + 1
            else:
                continue
            assert_flags_valid(words[i + 1:], cli, "deploy/README.md: " + " ".join(words))
            checked += 1
            break
    assert checked >= 3  # genfl-partition, docker run ... partition, generate.py
