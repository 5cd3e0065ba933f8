"""The committed stubs in shared/proto/ are exactly what proto/genfl.proto generates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]
STUBS = ("genfl_pb2.py", "genfl_pb2.pyi", "genfl_pb2_grpc.py")


def run_check(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfl_shared.protogen", "--check", "--repo", str(repo)],
                          capture_output=True, text=True, timeout=120)


def copy_layout(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "proto", repo / "proto")
    shutil.copytree(REPO_ROOT / "shared" / "proto", repo / "shared" / "proto")
    return repo


def test_committed_stubs_match_the_proto():
    done = run_check(REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stderr


def test_check_passes_on_an_unchanged_copy(tmp_path):
    done = run_check(copy_layout(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_fails_when_the_proto_changes(tmp_path):
    repo = copy_layout(tmp_path)
    proto = repo / "proto" / "genfl.proto"
    text = proto.read_text()
    anchor = "message SubmitReply {\n"
    assert text.count(anchor) == 1
    proto.write_text(text.replace(anchor, anchor + "  string added_field = 15;\n"))
    before = {name: (repo / "shared" / "proto" / name).read_bytes() for name in STUBS}

    done = run_check(repo)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stale" in done.stderr and "genfl_pb2.py" in done.stderr
    # --check only compares: the stale stubs are left as they were.
    assert {name: (repo / "shared" / "proto" / name).read_bytes() for name in STUBS} == before


def test_check_fails_when_a_stub_is_missing(tmp_path):
    repo = copy_layout(tmp_path)
    (repo / "shared" / "proto" / "genfl_pb2_grpc.py").unlink()
    done = run_check(repo)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "genfl_pb2_grpc.py" in done.stderr
