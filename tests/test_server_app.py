"""ServerApp in-process: start (listen on a free loopback port), run the method with real client
processes over real gRPC, stop; the results land in OUT as with genfl-server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import dataset_dir
from genfl_server.app import ServerApp, ServerSettings, new_run_state
from genfl_shared.config import PRESETS
from genfl_shared.partition import partition_dataset, shard_file_name
from genfl_shared.runfiles import ENDPOINT_JSON

pytestmark = pytest.mark.integration

CLIENTS = 2


def test_server_app_runs_the_method_in_process(tmp_path):
    shards = tmp_path / "shards"
    partition_dataset("mnist", dataset_dir("mnist"), CLIENTS, 0.5, 0, shards, train_subset=400)
    config = PRESETS["paper"].override(clients=CLIENTS, classifier_rounds=2, local_epochs=1, pretrain=False, seed=1)
    settings = ServerSettings(out=tmp_path / "run", phase="classifier", preset="paper", config=config,
                              dataset="mnist", address="127.0.0.1:0", register_timeout=120)
    app = ServerApp(settings, new_run_state(settings))
    address = app.start()
    assert json.loads((settings.out / ENDPOINT_JSON).read_text())["address"] == address
    assert not address.endswith(":0")
    clients = [subprocess.Popen([sys.executable, "-m", "genfl_client.cli", "--server", address, "--shard",
                                 str(shards / shard_file_name(i)), "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i in range(CLIENTS)]
    failure = None
    try:
        summary_path = app.run()
    except BaseException as error:
        failure = error
        raise
    finally:
        app.stop(failure)
        for client in clients:
            if failure is not None and client.poll() is None:
                client.kill()
            client.wait(60)
    assert [c.returncode for c in clients] == [0] * CLIENTS, [c.stderr.read()[-2000:] for c in clients]
    summary = json.loads(summary_path.read_text())
    assert [(r["phase"], r["round"]) for r in summary["rounds"]] == [("classifier", 1), ("classifier", 2)]
    assert summary["config"]["sgd_momentum"] == config.training.sgd_momentum and summary["pretrain"] is False
    assert (settings.out / "classifier.pt").exists()
