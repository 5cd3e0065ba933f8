"""Regenerate the gRPC/protobuf stubs in ``shared/proto/`` from ``proto/genfl.proto``.

The proto is the contract; the stubs are build output that we commit so that users need no
``grpcio-tools``. ``python -m genfl_shared.protogen`` rewrites them; ``--check`` (run by the test
suite, hence CI) fails when the committed stubs differ from what the proto generates.

The proto is compiled under the virtual path ``genfl_shared/proto/`` so that the generated
``genfl_pb2_grpc.py`` imports ``genfl_shared.proto.genfl_pb2`` (a package import, not a top-level
``genfl_pb2``).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import click

log = logging.getLogger(__name__)

STUB_NAMES = ("genfl_pb2.py", "genfl_pb2.pyi", "genfl_pb2_grpc.py")


def generate(proto_dir: Path, out_dir: Path) -> dict[str, bytes]:
    """Compile ``proto_dir/genfl.proto``; return {stub file name: content}."""
    from grpc_tools import protoc  # dev dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Igenfl_shared/proto={proto_dir}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            "genfl_shared/proto/genfl.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir / 'genfl.proto'}")
        generated = Path(tmp) / "genfl_shared" / "proto"
        stubs = {name: (generated / name).read_bytes() for name in STUB_NAMES}
    out_dir.mkdir(parents=True, exist_ok=True)
    return stubs


@click.command()
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Repository root (holds proto/ and shared/).")
@click.option("--check", is_flag=True, help="Only compare; exit 1 if the committed stubs are stale.")
def main(repo: Path, check: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    proto_dir, stub_dir = repo / "proto", repo / "shared" / "proto"
    stubs = generate(proto_dir.resolve(), stub_dir)
    stale = [n for n, data in stubs.items()
             if not (stub_dir / n).exists() or (stub_dir / n).read_bytes() != data]
    if check:
        if stale:
            log.error("stale generated stubs: %s; run `python -m genfl_shared.protogen`", ", ".join(stale))
            sys.exit(1)
        log.info("generated stubs are up to date")
        return
    for name, data in stubs.items():
        (stub_dir / name).write_bytes(data)
    log.info("wrote %s", ", ".join(str(stub_dir / n) for n in STUB_NAMES))


if __name__ == "__main__":
    main()
