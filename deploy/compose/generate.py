#!/usr/bin/env python3
"""Write a docker compose file for one GenFL run with K clients, plus its Prometheus config.

    python deploy/compose/generate.py --clients K --shards-dir ./runs/shards \\
        --out deploy/compose/docker-compose.yml [--dataset mnist] [--test-data ./data/mnist] [--rounds R]

Services: ``server`` (genfl-server, healthy once its gRPC health service answers SERVING),
``client-000`` ... ``client-{K-1}`` (each mounts only its own shard file, read-only, and starts once
the server is healthy), ``prometheus`` (scrapes the server and every client; config written next to
the compose file) and ``grafana`` (Prometheus datasource and the GenFL dashboard provisioned from
deploy/grafana; ``--no-grafana`` leaves it out). Paths in the compose file are relative to its own
folder, as compose resolves them. The server's outputs go to the named volume ``genfl-out``.
The project name goes into ``.env`` beside the compose file (COMPOSE_PROJECT_NAME, which docker-compose
v1 and docker compose v2 both read); the file uses nothing that only v2 knows.

``--secure``: mutual TLS and per-client tokens. A CA, the server's certificate (for the names
``server`` and ``localhost``), one certificate and one token per client and a certificate for the
health probe are made in ``--secrets-dir`` (with openssl; kept when they are there already); each
container mounts only its own files, read-only, under /run/secrets/genfl.

Needs click (installed with the project) and, for --secure, openssl and genfl_shared (the project);
the YAML is written without a YAML library.
``--check`` compares instead of writing (exit 1 when the files on disk differ from what these
options produce), which the tests use to keep the committed example current.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click
from click.core import ParameterSource

DEPLOY_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = DEPLOY_DIR.parent
GRPC_PORT = 50051
METRICS_PORT = 9100
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.0"
GRAFANA_IMAGE = "grafana/grafana:11.2.0"
DATASOURCE_UID = "genfl-prometheus"
SECRETS_MOUNT = "/run/secrets/genfl"
IMAGE_UID = 10001  # deploy/Dockerfile's user


def shard_name(index: int) -> str:
    """Must match genfl_shared.partition.shard_file_name (the tests check it)."""
    return f"client-{index:03d}.npz"


def client_service(index: int) -> str:
    return f"client-{index:03d}"


# --------------------------------------------------------------------------------------------------
# A small YAML writer: mappings, sequences and scalars; strings are quoted JSON-style unless plainly safe.
# --------------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_RESERVED = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "nan", "inf"}


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)


def _is_scalar(value) -> bool:
    return not isinstance(value, (dict, list))


def _emit(value, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{_scalar(key)}:"
            if _is_scalar(item):
                lines.append(f"{head} {_scalar(item)}")
            elif not item:
                lines.append(f"{head} {'{}' if isinstance(item, dict) else '[]'}")
            elif isinstance(item, list) and all(map(_is_scalar, item)) and len(json.dumps(item)) <= 90:
                lines.append(f"{head} [{', '.join(json.dumps(x) for x in item)}]")
            else:
                lines.append(head)
                _emit(item, indent + 2, lines)
    elif isinstance(value, list):
        for item in value:
            if _is_scalar(item):
                lines.append(f"{pad}- {_scalar(item)}")
            else:
                sub: list[str] = []
                _emit(item, indent + 2, sub)
                lines.append(f"{pad}- {sub[0][indent + 2:]}")
                lines.extend(sub[1:])
    else:
        lines.append(pad + _scalar(value))


def to_yaml(value, header: str = "") -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    _emit(value, 0, lines)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _rel(path: Path, start: Path) -> str:
    """``path`` relative to the compose file's folder, as compose expects (./x or ../x)."""
    rel = os.path.relpath(path.resolve(), start.resolve()).replace(os.sep, "/")
    return rel if rel.startswith("..") else f"./{rel}"


def _secret(secrets: str, name: str, as_name: str | None = None) -> str:
    return f"{secrets}/{name}:{SECRETS_MOUNT}/{as_name or name}:ro"


def server_option_env(options: tuple[str, ...]) -> dict[str, str]:
    """--server-option NAME=VALUE (a genfl-server option without its dashes) -> {GENFL_NAME: VALUE}."""
    env = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.strip().removeprefix("--")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise click.UsageError(f"--server-option {option!r}: give NAME=VALUE, e.g. synthetic-samples=200")
        env["GENFL_" + name.upper().replace("-", "_")] = value
    return env


def _sends_synthetic_mix(server_env: dict[str, str]) -> bool:
    try:
        return float(server_env.get("GENFL_CLIENT_SYNTHETIC_MIX", "0")) > 0
    except ValueError:  # genfl-server refuses it with a clear message when the stack starts
        return False


def build(opts: dict) -> tuple[dict, dict]:
    """(compose model, prometheus config) for the given options."""
    clients: int = opts["clients"]
    out_dir = Path(opts["out"]).parent
    shards = _rel(Path(opts["shards_dir"]), out_dir)
    image = opts["image"]
    secure = opts["secure"]
    secrets = _rel(Path(opts["secrets_dir"]), out_dir) if secure else None

    server_env = {
        "GENFL_PHASE": opts["phase"],
        "GENFL_ADDRESS": f"0.0.0.0:{GRPC_PORT}",
        "GENFL_CLIENTS": str(clients),
        "GENFL_DATASET": opts["dataset"],
        "GENFL_PRESET": opts["preset"],
        "GENFL_OUT": "/out",
        "GENFL_METRICS_PORT": str(METRICS_PORT),
        # Keep /metrics up after the run so that Prometheus (5 s interval) scrapes the final values.
        "GENFL_LINGER_SECONDS": str(opts["linger_seconds"]),
        "GENFL_PARTITION_INFO": "/config/partition.json",
        "GENFL_SEED": str(opts["seed"]),
        "GENFL_LOG_FORMAT": opts["log_format"],
    }
    for key in ("rounds", "cvae_rounds", "classifier_rounds"):
        if opts.get(key) is not None:
            server_env[f"GENFL_{key.upper()}"] = str(opts[key])
    if not opts["pretrain"]:
        server_env["GENFL_PRETRAIN"] = "false"
    if opts.get("server_threads"):
        server_env["GENFL_THREADS"] = str(opts["server_threads"])
    server_env.update(server_option_env(opts.get("server_option", ())))
    server_volumes = [f"{shards}/partition.json:/config/partition.json:ro", "genfl-out:/out"]
    if opts.get("test_data") is not None:
        server_env["GENFL_TEST_DATA"] = "/data/test"
        server_volumes.append(f"{_rel(Path(opts['test_data']), out_dir)}:/data/test:ro")
    probe = ["CMD", "genfl-health", "probe", "--address", f"localhost:{GRPC_PORT}"]
    if secure:
        server_env.update({
            "GENFL_TLS_CERT": f"{SECRETS_MOUNT}/server.pem",
            "GENFL_TLS_KEY": f"{SECRETS_MOUNT}/server.key",
            "GENFL_CLIENT_CA": f"{SECRETS_MOUNT}/ca.pem",
            "GENFL_TOKENS_FILE": f"{SECRETS_MOUNT}/tokens.json",
        })
        server_volumes += [_secret(secrets, name) for name in
                           ("ca.pem", "server.pem", "server.key", "tokens.json", "health.pem", "health.key")]
        # Mutual TLS: the probe, too, shows a certificate of the CA (its own, not a client's).
        probe += ["--ca", f"{SECRETS_MOUNT}/ca.pem", "--tls-cert", f"{SECRETS_MOUNT}/health.pem",
                  "--tls-key", f"{SECRETS_MOUNT}/health.key"]

    server = {
        "image": image,
        "build": {"context": _rel(REPO_ROOT, out_dir), "dockerfile": "deploy/Dockerfile"},
        # once: a completed run idles instead of exiting (results stay; `up` again starts no new run),
        # a restarted server resumes an interrupted run (run_state.pt in /out).
        "command": ["once", "server"],
        "environment": server_env,
        "volumes": server_volumes,
        "expose": [str(GRPC_PORT), str(METRICS_PORT)],
        "healthcheck": {
            # "" (the whole server): NOT_SERVING until it listens with its data loaded.
            "test": probe,
            "interval": "5s",
            # The probe is a Python process (grpc import): on a loaded machine it needs seconds to start.
            "timeout": "10s",
            "retries": 3,
            "start_period": "5m",
        },
        "stop_grace_period": "30s",
        "restart": "on-failure:3",
    }
    if not opts["build"]:
        del server["build"]
    services: dict = {"server": server}
    for index in range(clients):
        client_env = {
            "GENFL_SERVER": f"server:{GRPC_PORT}",
            "GENFL_SHARD": "/data/shard.npz",
            "GENFL_METRICS_PORT": str(METRICS_PORT),
            # Like the server: Prometheus gets to scrape the client's final values.
            "GENFL_LINGER_SECONDS": str(opts["linger_seconds"]),
            "GENFL_THREADS": str(opts["client_threads"]),
            "GENFL_LOG_FORMAT": opts["log_format"],
        }
        if _sends_synthetic_mix(server_env):  # the server needs each client's label counts for it
            client_env["GENFL_SHARE_LABEL_COUNTS"] = "true"
        # Only this client's shard: the container cannot see any other client's data.
        client_volumes = [f"{shards}/{shard_name(index)}:/data/shard.npz:ro"]
        if secure:
            name = client_service(index)
            client_env.update({
                "GENFL_CA": f"{SECRETS_MOUNT}/ca.pem",
                "GENFL_TLS_CERT": f"{SECRETS_MOUNT}/client.pem",
                "GENFL_TLS_KEY": f"{SECRETS_MOUNT}/client.key",
                "GENFL_TOKEN_FILE": f"{SECRETS_MOUNT}/client.token",
            })
            # Its own certificate and token only: no client can act as another.
            client_volumes += [_secret(secrets, "ca.pem"), _secret(secrets, f"{name}.pem", "client.pem"),
                               _secret(secrets, f"{name}.key", "client.key"),
                               _secret(secrets, f"{name}.token", "client.token")]
        services[client_service(index)] = {
            "image": image,
            # Built by the server service (or `docker build`); never looked for on a registry.
            **({"pull_policy": "never"} if opts["build"] else {}),
            "command": ["client"],
            "environment": client_env,
            "volumes": client_volumes,
            "expose": [str(METRICS_PORT)],
            "depends_on": {"server": {"condition": "service_healthy"}},
            "restart": "on-failure:3",
        }
    prometheus_file = Path(opts["out"]).with_name("prometheus.yml")
    services["prometheus"] = {
        "image": opts["prometheus_image"],
        "command": ["--config.file=/etc/prometheus/prometheus.yml",
                    "--storage.tsdb.retention.time=7d", "--web.enable-lifecycle"],
        "volumes": [f"./{prometheus_file.name}:/etc/prometheus/prometheus.yml:ro"],
        "ports": [f"127.0.0.1:{opts['prometheus_port']}:9090"],
        "restart": "unless-stopped",
    }
    grafana = _rel(DEPLOY_DIR / "grafana", out_dir)
    if opts["grafana"]:
        services["grafana"] = {
            "image": GRAFANA_IMAGE,
            "environment": {
                "GF_AUTH_ANONYMOUS_ENABLED": "true",
                "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                "GF_SECURITY_ADMIN_PASSWORD": "${GRAFANA_ADMIN_PASSWORD:-admin}",
                "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/genfl.json",
            },
            "volumes": [f"{grafana}/provisioning:/etc/grafana/provisioning:ro",
                        f"{grafana}/dashboards:/var/lib/grafana/dashboards:ro"],
            "ports": [f"127.0.0.1:{opts['grafana_port']}:3000"],
            "depends_on": ["prometheus"],
            "restart": "unless-stopped",
        }
    # No top-level `name:` (docker-compose v1 refuses it): the project name is in .env (write_files).
    compose = {"services": services, "volumes": {"genfl-out": {}}}

    prometheus = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {"job_name": "genfl-server",
             "static_configs": [{"targets": [f"server:{METRICS_PORT}"], "labels": {"role": "server"}}]},
            {"job_name": "genfl-client",
             "static_configs": [{"targets": [f"{client_service(i)}:{METRICS_PORT}"],
                                 "labels": {"role": "client", "client": client_service(i)}}
                                for i in range(clients)]},
            {"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]},
        ],
    }
    return compose, prometheus


def _check_shards(opts: dict) -> None:
    """Catch a mismatch with the partition on disk now rather than as a run that never starts."""
    shards = Path(opts["shards_dir"])
    info = shards / "partition.json"
    if not info.is_file():
        click.echo(f"note: {info} does not exist yet; partition into {shards} before `docker compose up` "
                   "(docker would create missing mount sources as empty folders)", err=True)
        return
    partition = json.loads(info.read_text())
    if partition.get("num_clients") != opts["clients"]:
        raise click.UsageError(f"{info} has {partition.get('num_clients')} clients, not --clients {opts['clients']}")
    if partition.get("dataset") not in (None, opts["dataset"]):
        raise click.UsageError(f"{info} is a {partition['dataset']} partition, not --dataset {opts['dataset']}")
    missing = [shard_name(i) for i in range(opts["clients"]) if not (shards / shard_name(i)).is_file()]
    if missing:
        raise click.UsageError(f"missing shard files in {shards}: {', '.join(missing[:5])}")


# --------------------------------------------------------------------------------------------------
# --secure: a CA, certificates and tokens (openssl; the tokens as genfl_server.security make-tokens)
# --------------------------------------------------------------------------------------------------

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def secret_files(clients: int) -> list[str]:
    """Every file the containers mount from --secrets-dir."""
    names = ["ca.pem", "server.pem", "server.key", "tokens.json", "health.pem", "health.key"]
    for index in range(clients):
        names += [f"{client_service(index)}.{ext}" for ext in ("pem", "key", "token")]
    return names


def _openssl(*args: str, cwd: Path) -> None:
    import subprocess

    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def _certificate(folder: Path, name: str, subject: str, extensions: str) -> None:
    """folder/name.pem + name.key, signed by folder/ca.pem."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "825", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder)
    for leftover in (f"{name}.ext", f"{name}.csr"):
        (folder / leftover).unlink()


def make_secrets(folder: Path, clients: int) -> bool:
    """Make the CA, certificates and tokens in ``folder`` unless all are there; True when made."""
    import shutil

    if all((folder / name).is_file() for name in secret_files(clients)):
        return False
    if shutil.which("openssl") is None:
        raise click.ClickException("--secure needs openssl (Debian: apt-get install openssl)")
    from genfl_shared.security import make_tokens  # the project's own tool: the format the server reads

    folder.mkdir(parents=True, exist_ok=True)
    # Only the owner gets into the folder: the files inside must be readable by the containers' user.
    folder.chmod(0o700)
    _openssl("req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "825",
             "-subj", "/CN=GenFL compose CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    # Clients dial server:50051; the healthcheck dials localhost inside the server's container.
    _certificate(folder, "server", "/CN=server",
                 "subjectAltName=DNS:server,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _certificate(folder, "health", "/CN=genfl-health", "extendedKeyUsage=clientAuth\n")
    ids = [client_service(index) for index in range(clients)]
    for client_id in ids:
        _certificate(folder, client_id, f"/CN={client_id}", "extendedKeyUsage=clientAuth\n")
    make_tokens(folder, ids, force=True)
    for name in secret_files(clients):
        path = folder / name
        if os.geteuid() == 0:
            # As root: hand the files to the image's user, readable by it only.
            os.chown(path, IMAGE_UID, IMAGE_UID)
            path.chmod(0o600 if name.endswith((".key", ".token")) else 0o644)
        else:
            # Not root: the container user (another uid) must read them; the 0700 folder keeps
            # everyone else on this machine out (genfl-client warns that its token is readable by others).
            path.chmod(0o644)
    return True


_ALWAYS_SHOWN = ("clients", "shards_dir", "out")


def _header(ctx: click.Context) -> str:
    """The command that regenerates the files: the core options plus every one not at its default."""
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "check" or (param.name not in _ALWAYS_SHOWN
                                     and ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT):
            continue
        flag = param.opts[0]
        if isinstance(param, click.Option) and param.is_flag:
            args.append(flag if value else param.secondary_opts[0])
        elif isinstance(param, click.Option) and param.multiple:
            for item in value:
                args += [flag, item]
        else:
            args += [flag, str(value)]
    return ("Generated by deploy/compose/generate.py; do not edit, regenerate with:\n"
            f"  python deploy/compose/generate.py {' '.join(args)}\n")


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@click.option("--clients", type=click.IntRange(1, 999), required=True, help="Number of clients K.")
@click.option("--shards-dir", type=click.Path(file_okay=False), default="./runs/shards",
              help="Folder with client-NNN.npz and partition.json (from genfl-partition).")
@click.option("--out", type=click.Path(dir_okay=False), default="deploy/compose/docker-compose.yml",
              help="Compose file to write; prometheus.yml is written next to it.")
@click.option("--dataset", type=click.Choice(["mnist", "fmnist"]), default="mnist", help="Dataset of the run.")
@click.option("--preset", type=click.Choice(["quick", "paper"]), default="quick", help="Server preset.")
@click.option("--phase", type=click.Choice(["cvae", "classifier", "all"]), default="all",
              help="Server --phase (classifier needs --no-pretrain: there is no CVAE checkpoint to mount).")
@click.option("--pretrain/--no-pretrain", default=True, help="--no-pretrain: the baseline (no synthetic pre-training).")
@click.option("--rounds", type=click.IntRange(0), default=None, help="Rounds of each federated phase.")
@click.option("--cvae-rounds", type=click.IntRange(0), default=None)
@click.option("--classifier-rounds", type=click.IntRange(0), default=None)
@click.option("--seed", type=int, default=0, help="Server --seed.")
@click.option("--test-data", type=click.Path(file_okay=False), default=None,
              help="Host folder with the real test split, mounted read-only (test accuracy and CAS).")
@click.option("--image", default="genfl:latest", help="Image of the server and clients (deploy/Dockerfile).")
@click.option("--prometheus-image", default=PROMETHEUS_IMAGE,
              help="Prometheus image, e.g. genfl-prometheus:latest (deploy/build-image.sh --offline).")
@click.option("--grafana/--no-grafana", default=True, help="Include the Grafana service.")
@click.option("--server-option", multiple=True, metavar="NAME=VALUE",
              help="Any other genfl-server option, without its dashes (e.g. synthetic-samples=200); repeatable.")
@click.option("--secure/--no-secure", default=False,
              help="Mutual TLS and per-client tokens (CA, certificates and tokens made in --secrets-dir).")
@click.option("--secrets-dir", type=click.Path(file_okay=False), default="./runs/compose-secrets",
              help="--secure: folder for the CA, certificates and tokens (kept when complete).")
@click.option("--client-threads", type=click.IntRange(1), default=1, help="Torch threads per client.")
@click.option("--server-threads", type=click.IntRange(0), default=0, help="Torch threads of the server (0: all).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--linger-seconds", type=click.IntRange(0), default=15,
              help="Server keeps /metrics up this long after the run (final values get scraped).")
@click.option("--prometheus-port", type=click.IntRange(1, 65535), default=9090, help="Host port (127.0.0.1).")
@click.option("--grafana-port", type=click.IntRange(1, 65535), default=3000, help="Host port (127.0.0.1).")
@click.option("--project-name", default="genfl", help="Compose project name.")
@click.option("--build/--no-build", default=True,
              help="Build the image from this repository on `up` (--no-build: pull --image from a registry).")
@click.option("--check", is_flag=True, help="Compare with the files on disk instead of writing them.")
@click.pass_context
def main(ctx: click.Context, **opts) -> None:
    """Write a docker compose file (and prometheus.yml beside it) for a run with K clients."""
    check = opts.pop("check")
    if opts["phase"] == "classifier" and opts["pretrain"]:
        raise click.UsageError("--phase classifier pre-trains from a CVAE checkpoint, which this compose file "
                               "does not mount; use --phase all, or --no-pretrain for the baseline")
    if not check:
        _check_shards(opts)
    compose, prometheus = build(opts)
    out = Path(opts["out"])
    header = _header(ctx)
    files = {out: to_yaml(compose, header), out.with_name("prometheus.yml"): to_yaml(prometheus, header),
             # Read by docker-compose v1 and docker compose v2 from the compose file's folder.
             out.with_name(".env"): "".join(f"# {line}\n" for line in header.splitlines())
             + f"COMPOSE_PROJECT_NAME={opts['project_name']}\n"}
    if check:
        stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        if stale:
            raise click.ClickException(f"out of date: {', '.join(stale)} (rerun without --check)")
        click.echo("up to date")
        return
    if opts["secure"] and make_secrets(Path(opts["secrets_dir"]), opts["clients"]):
        click.echo(f"made a CA, certificates and tokens in {opts['secrets_dir']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
