"""The transport's flow control (genfl_server/flow.py) without gRPC: receive slots and the upload
queue, download slots, RPCs per peer, and polls woken from another thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from genfl_server import flow
from genfl_server.flow import FlowControl
from genfl_server.limits import UploadClock
from genfl_server.metrics import ServerMetrics
from genfl_shared.errors import Rejected

pytestmark = pytest.mark.unit


def flow_control(uploads: int = 1, downloads: int = 1, per_connection: int = 2) -> FlowControl:
    return FlowControl(ServerMetrics(), max_concurrent_uploads=uploads, max_concurrent_downloads=downloads,
                       max_streams_per_connection=per_connection, max_streams_per_ip=0)


def test_an_upload_waiting_for_a_slot_holds_a_queue_place_and_its_clock_is_paused():
    async def scenario():
        control = flow_control(uploads=1)  # 1 slot, UPLOAD_QUEUE_PER_SLOT places
        first_clock, second_clock = UploadClock(0.3), UploadClock(0.3)
        first_in_slot, release_first = asyncio.Event(), asyncio.Event()

        async def first():
            async with control.upload_slot(first_clock, lambda: asyncio.sleep(0)):
                first_in_slot.set()
                await release_first.wait()

        holder = asyncio.create_task(first())
        await first_in_slot.wait()
        waiter_in_slot = asyncio.Event()
        remaining_in_slot: list[float] = []

        async def second():
            async with control.upload_slot(second_clock, lambda: asyncio.sleep(0)):
                waiter_in_slot.set()
                remaining_in_slot.append(second_clock.remaining())

        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.5)  # longer than the upload timeout: the wait is the server's doing
        assert not waiter_in_slot.is_set()
        release_first.set()
        await asyncio.wait_for(waiter, 5)
        await holder
        assert remaining_in_slot[0] > 0.2

    asyncio.run(scenario())


def test_a_download_goes_on_without_a_slot_past_the_wait(monkeypatch):
    monkeypatch.setattr(flow, "DOWNLOAD_SLOT_WAIT_SECONDS", 0.05)

    async def scenario():
        control = flow_control(downloads=1)
        async with control.download_slot():
            async with control.download_slot():  # the slot is held: proceeds after the wait
                pass
        async with control.download_slot():  # released on the way out
            pass

    asyncio.run(asyncio.wait_for(scenario(), 5))


def test_rpcs_per_connection_are_bounded_and_counted():
    control = flow_control(per_connection=2)
    keys = [control.enter_stream("ipv4:10.0.0.1:5000") for _ in range(2)]
    assert control.metrics.registry.get_sample_value("genfl_rpcs_open") == 2
    with pytest.raises(Rejected) as refused:
        control.enter_stream("ipv4:10.0.0.1:5000")
    assert refused.value.reason == "too_many_streams"
    for key in keys:
        control.leave_stream(key)
    assert control.metrics.registry.get_sample_value("genfl_rpcs_open") == 0


def test_a_poll_is_woken_from_another_thread_and_counts_as_connected():
    async def scenario():
        control = flow_control()
        control.serve_on(asyncio.get_running_loop())
        posted: list[str] = []
        threading.Timer(0.1, lambda: (posted.append("task"), control.wake_polls_threadsafe())).start()
        with control.polling("c0"):
            assert control.metrics.registry.get_sample_value("genfl_clients_connected") == 1
            found = await control.wait_for(lambda: posted[0] if posted else None, timeout=10)
        assert found == "task"
        assert control.metrics.registry.get_sample_value("genfl_clients_connected") == 0
        assert await control.wait_for(lambda: None, timeout=0.05) is None
        control.close()

    asyncio.run(asyncio.wait_for(scenario(), 5))
