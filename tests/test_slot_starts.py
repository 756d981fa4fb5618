"""Fresh slots' starts go before started slots' calls (atropos.sandbox.server.starts), on real
runners: the call of a slot whose trajectory has begun waits while a start that a call waits for is
under way, never longer than the hold (once, however many calls come meanwhile); a warm slot's
first call is not held (its trajectory has not begun), and neither a warm start (no call waits for
it) nor a fork's copy before its start holds anything back. Closing a slot (the server stopping)
ends a start that hangs, and its call, at once.

A slot's start is held at a gate (a FIFO its command reads before it execs the runner), so which
call ran before which is seen in the calls' own output, not in timings."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from atropos.host import command_line, snapshot
from atropos.sandbox.image_slots import SlotImage
from atropos.sandbox.models import BashCall, Enforcement, StatusResponse
from atropos.sandbox.runner.protocol import Outcome, ToolOp
from atropos.sandbox.server.app import SandboxApp
from atropos.sandbox.server.isolation import Fork, runner_command, sandbox_env
from atropos.sandbox.server.slot_runner import SlotFailure, SlotRunner
from atropos.sandbox.server.snapshots import Snapshot
from atropos.sandbox.server.starts import Starts
from atropos.sandbox.status import render


def bash(command: str) -> ToolOp:
    return BashCall.model_validate({"slot": 0, "tool": "bash", "args": {"command": command}}).runner_op(30.0)


class Slots:
    """Three slots of one server (no sandbox: the runner alone): one started first, one whose start
    is gated, one to fork (its copy gated)."""

    def __init__(self, tmp: Path, hold: float) -> None:
        self.gate = tmp / "gate"
        os.mkfifo(self.gate)
        self.released = tmp / "released"  # made just before the gate opens
        self.starts = Starts(hold=hold)
        self.started, self.gated = self._slot(tmp, 0, None), self._slot(tmp, 1, self.gate)
        self.forked = self._slot(tmp, 2, None)

    def _slot(self, tmp: Path, index: int, gate: Path | None) -> SlotRunner:
        workspace = str(tmp / f"slot{index}")
        os.makedirs(workspace)
        runner = runner_command(workspace, 1 << 16, 1 << 20)
        prefix = ["sh", "-c", 'read _ < "$0" && exec "$@"', str(gate)] if gate is not None else []

        def command(_fork: Fork | None, _image: SlotImage | None) -> list[str]:
            return [*prefix, *runner]

        return SlotRunner(index, workspace, command, sandbox_env(str(tmp), workspace), starts=self.starts)

    def wait_at_gate(self) -> None:
        """What a slot's start or copy blocks on, in a thread: until `open_gate`."""
        with open(self.gate) as gate:
            gate.read()

    async def fork(self, snapshot: Snapshot) -> None:
        """The third slot forked from `snapshot`, its copy waiting at the gate."""
        await self.forked.fork_from(snapshot, lambda _src, _dst: self.wait_at_gate(), lambda: None)

    def open_gate(self) -> None:
        self.released.touch()
        with open(self.gate, "w") as gate:  # what waits at the gate holds the other end
            gate.write("go\n")

    def open_gate_if_awaited(self) -> None:
        """The gate opened for whatever still waits at it (a test that failed first), if anything."""
        self.released.touch()
        try:
            fd = os.open(self.gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # nothing waits at it
            return
        os.write(fd, b"go\n")
        os.close(fd)

    async def awaited(self) -> None:
        """Until the gated slot's start is one a call waits for (a few turns of the loop)."""
        for _ in range(100):
            if self.starts.awaited:
                return
            await asyncio.sleep(0)
        raise AssertionError("the gated slot's start never became one a call waits for")

    def which(self) -> str:
        """A command saying whether the gate had opened when it ran."""
        return f"test -e {self.released} && echo after || echo before"


async def unheld(call: Awaitable[Outcome]) -> Outcome:
    """The outcome of a call that must not wait for the gated start (the hold is 60 s: a call held
    by it would still answer, only later)."""
    try:
        return await asyncio.wait_for(call, 30.0)
    except asyncio.TimeoutError:
        raise AssertionError("the call was held until the gated start ends") from None


async def status_of(*slots: SlotRunner) -> str:
    """`atropos-sandbox status` of a server of these slots, as its /status answers."""
    enforcement = Enforcement(
        isolation="none", runner="python", network="allow", uid=os.getuid(), limits={}, cgroups=[]
    )
    app = SandboxApp(list(slots), token="t", default_timeout=30.0, enforcement=enforcement, max_body=1 << 20)
    answer = await app.status(make_mocked_request("GET", "/status"))
    assert answer.text is not None
    return render("http://server", StatusResponse.model_validate_json(answer.text))


@pytest.fixture
async def slots(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Slots]:
    three = Slots(tmp_path, hold=float(request.param))
    try:
        yield three
    finally:
        three.open_gate_if_awaited()
        await asyncio.gather(three.started.close(), three.gated.close(), three.forked.close())


@pytest.mark.parametrize("slots", [60.0], indirect=True)
async def test_a_started_slots_call_waits_for_a_fresh_slots_start_that_a_call_waits_for(slots: Slots) -> None:
    assert (await slots.started.execute(bash("true")))["exit_code"] == 0
    fresh = asyncio.ensure_future(slots.gated.execute(bash("echo fresh")))
    await slots.awaited()
    held = asyncio.ensure_future(slots.started.execute(bash(slots.which())))
    done, _ = await asyncio.wait({held}, timeout=1.0)  # time for a call that is not held to run
    assert not done, f"the started slot's call ran while a fresh slot started: {held.result()}"
    slots.open_gate()
    assert (await fresh)["stdout"] == "fresh\n"
    assert (await held)["stdout"] == "after\n"
    assert slots.starts.awaited == 0


@pytest.mark.parametrize("slots", [0.3], indirect=True)
async def test_a_start_holds_started_slots_calls_no_longer_than_the_hold(slots: Slots) -> None:
    assert (await slots.started.execute(bash("true")))["exit_code"] == 0
    fresh = asyncio.ensure_future(slots.gated.execute(bash("echo fresh")))
    await slots.awaited()
    # the gate is still shut: the call goes once the hold is over
    assert (await slots.started.execute(bash(slots.which())))["stdout"] == "before\n"
    slots.open_gate()
    assert (await fresh)["stdout"] == "fresh\n"


@pytest.mark.parametrize("slots", [60.0], indirect=True)
async def test_a_warm_start_holds_nothing_back(slots: Slots) -> None:
    assert (await slots.started.execute(bash("true")))["exit_code"] == 0
    warming = asyncio.ensure_future(slots.gated.warm_up())  # ahead of demand: nobody waits for it
    await asyncio.sleep(0)
    assert slots.starts.awaited == 0
    assert (await unheld(slots.started.execute(bash(slots.which()))))["stdout"] == "before\n"
    slots.open_gate()
    await warming
    assert slots.gated.warm


@pytest.mark.parametrize("slots", [1.0], indirect=True)
async def test_calls_meanwhile_wait_once_for_the_hold_not_each_for_its_own(slots: Slots) -> None:
    """A start that does not end (a slot made to start slowly, say) costs the others' calls one
    hold in all: the calls after the hold is over are not held again."""
    assert (await slots.started.execute(bash("true")))["exit_code"] == 0
    loop = asyncio.get_running_loop()
    began = loop.time()  # before the start: the hold runs from it on
    fresh = asyncio.ensure_future(slots.gated.execute(bash("echo fresh")))
    await slots.awaited()
    assert (await slots.started.execute(bash(slots.which())))["stdout"] == "before\n"
    assert loop.time() - began >= slots.starts.hold  # held until the hold was over
    began = loop.time()
    for _ in range(3):  # three more holds would take three times as long
        assert (await slots.started.execute(bash(slots.which())))["stdout"] == "before\n"
    assert loop.time() - began < slots.starts.hold, "the calls after the hold were held again"
    slots.open_gate()
    assert (await fresh)["stdout"] == "fresh\n"


@pytest.mark.parametrize("slots", [60.0], indirect=True)
async def test_a_forks_copy_holds_nothing_back(slots: Slots, tmp_path: Path) -> None:
    """A fork copies its snapshot before its sandbox starts (where overlays cannot work), which can
    take seconds; a call waiting for that fork does not hold the other slots' calls meanwhile."""
    assert (await slots.started.execute(bash("true")))["exit_code"] == 0
    snapshot = Snapshot(name="s", path=str(tmp_path / "snap"), source_slot=0, created=0.0, ready=True)
    copying = asyncio.ensure_future(slots.fork(snapshot))
    await asyncio.sleep(0)
    forked = asyncio.ensure_future(slots.forked.execute(bash("echo forked")))
    await asyncio.sleep(0)
    assert slots.starts.awaited == 0
    assert (await unheld(slots.started.execute(bash(slots.which()))))["stdout"] == "before\n"
    slots.open_gate()
    await copying
    assert (await forked)["stdout"] == "forked\n"


@pytest.mark.parametrize("slots", [60.0], indirect=True)
async def test_a_warm_slots_first_call_is_not_held(slots: Slots) -> None:
    """A trajectory that has not begun goes first, whether its slot is warm or not."""
    await slots.forked.warm_up()
    fresh = asyncio.ensure_future(slots.gated.execute(bash("echo fresh")))
    await slots.awaited()
    assert (await unheld(slots.forked.execute(bash(slots.which()))))["stdout"] == "before\n"
    slots.open_gate()
    assert (await fresh)["stdout"] == "fresh\n"


@pytest.mark.parametrize("slots", [60.0], indirect=True)
async def test_closing_a_slot_ends_a_start_that_hangs_and_its_call(slots: Slots) -> None:
    """The server stopping does not wait for a sandbox that never comes up (aiohttp would wait a
    minute for its call), and no sandbox starts after."""
    fresh = asyncio.ensure_future(slots.gated.execute(bash("echo fresh")))
    await slots.awaited()
    for _ in range(3000):  # the gated start spawned, waiting at the gate: a start that hangs
        if slots.gated.starting:
            break
        await asyncio.sleep(0.01)
    assert any(str(slots.gate) in command_line(pid) for pid in snapshot())
    assert "   1  starting" in await status_of(slots.started, slots.gated)  # where an operator sees it
    await slots.gated.close()
    with pytest.raises(SlotFailure, match="did not start"):
        await unheld(fresh)
    assert not any(str(slots.gate) in command_line(pid) for pid in snapshot()), "the hung start outlived its slot"
    with pytest.raises(SlotFailure, match="stopping"):
        await unheld(slots.gated.execute(bash("true")))


@pytest.mark.parametrize("slots", [60.0], indirect=True)
async def test_a_slot_closed_while_its_sandbox_is_spawned_starts_none(slots: Slots) -> None:
    """Closed between the spawn and its end: the sandbox is stopped as soon as the spawn returns."""
    fresh = asyncio.ensure_future(slots.gated.execute(bash("echo fresh")))
    await slots.awaited()
    assert not slots.gated.starting  # the spawn has not returned yet: no turn of the loop since it began
    await slots.gated.close()
    with pytest.raises(SlotFailure, match="no sandbox starts"):
        await unheld(fresh)
    assert not any(str(slots.gate) in command_line(pid) for pid in snapshot()), "the sandbox outlived its slot"
