"""A client host: several clients in one process, each a separate client over the real protocol
(its own channel, registration, session, token, Presence stream and metrics series), sharing the
process's one torch runtime.

Each client runs its ClientRunner in a thread of its own, so that every client keeps its long
poll and its Presence stream open while another trains; the torch work itself is serialised by
one lock shared by the executors (on the CPU the clients' tasks run one after the other, which
is also what makes a host's results bit-identical to separate processes under --deterministic).

A client that fails fatally (registration refused, token denied, server unreachable too long) is
logged with its client id; the others go on until the server ends the run, and the process then
exits with the worst of the clients' exit codes (3 for a fatal error), never 0."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from genfl_shared.cli import set_thread_log_context

from .runner import ClientRunner, FatalClientError

log = logging.getLogger(__name__)

EXIT_COMPLETED, EXIT_RUN_FAILED, EXIT_FATAL = 0, 1, 3


@dataclass
class HostedClient:
    runner: ClientRunner
    exit_code: int | None = None  # None while it runs
    thread: threading.Thread | None = field(default=None, repr=False)


class ClientHost:
    def __init__(self, runners: list[ClientRunner]):
        ids = [r.client_id for r in runners]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a host serves each client id once; given {ids}")
        self.clients = [HostedClient(r) for r in runners]

    def run(self) -> int:
        """Serve every client until each has ended; returns the process exit code: 0 when every
        client completed the run, else the highest client exit code (1: the run failed, 3: fatal)."""
        for client in self.clients:
            client.thread = threading.Thread(target=self._serve, args=(client,), daemon=True,
                                             name=f"client-{client.runner.client_id}")
            client.thread.start()
        for client in self.clients:
            client.thread.join()
        failed = {c.runner.client_id: c.exit_code for c in self.clients if c.exit_code != EXIT_COMPLETED}
        if failed:
            log.error("%d of %d hosted clients did not complete: %s", len(failed), len(self.clients),
                      ", ".join(f"{cid} (exit {code})" for cid, code in failed.items()))
        return max((c.exit_code for c in self.clients), default=EXIT_COMPLETED)

    def close(self) -> None:
        for client in self.clients:
            client.runner.close()

    @staticmethod
    def _serve(client: HostedClient) -> None:
        runner = client.runner
        set_thread_log_context(client_id=runner.client_id)
        try:
            client.exit_code = runner.run()
        except FatalClientError as error:
            log.error("client %s: %s", runner.client_id, error)
            client.exit_code = EXIT_FATAL
        except Exception:  # a bug in one client must not pass for success, nor hide the others' outcome
            log.exception("client %s failed", runner.client_id)
            client.exit_code = EXIT_FATAL
        finally:
            runner.close()
        if client.exit_code == EXIT_RUN_FAILED:
            log.error("client %s: the server reported that the run failed", runner.client_id)
