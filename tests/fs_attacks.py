"""What a hostile slot tries on the file system, and the secrets a test plants for it to find.

The attacker slot looks the way an agent would: `find /` over everything it can see (every mount but
/proc, /sys and /dev) for the names of what it wants, then the paths it can guess (the data dir
where the server keeps it, `/data/slots/N`, `/run/atropos/data/slots/N`, `../N`, the package's
install locations). Each file found is read for the secret; a line `LEAK <what>:<path>` comes back
only when the secret was in it. `tests/test_isolation_filesystem.py` runs the same script where the
attack must work (`--isolation none`), so a script that can no longer find anything fails there.
"""

from __future__ import annotations

import os
import secrets
import shlex
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from atropos.sandbox.rootfs import package_dir
from atropos.slots import SlotPool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a line of a built-in task's hidden check (atropos/envs/tasks/builtin.jsonl), and that file's name
HIDDEN_CHECK = "fizzbuzz_fifteen.py"
HIDDEN_CHECK_TEXT = 'out[14] == \\"FizzBuzz\\"'
TASKS_FILE = "builtin.jsonl"
SENTINEL_PREFIX = "atropos-sentinel-"
# where a sentinel goes, where the test may write: outside every system dir, world-readable
SENTINEL_DIRS = ("/opt", "/srv", "/home", "/mnt", "/var/lib", REPO, "/tmp")


@dataclass
class Secrets:
    """What the attacker must never read, and where it sits."""

    victim_slot: int
    data_dir: str  # as the server sees it (inside a container: /data)
    token: str
    marker_name: str = field(default_factory=lambda: f"marker-{secrets.token_hex(6)}.txt")
    marker_text: str = field(default_factory=lambda: f"MARKER-{secrets.token_hex(12)}")
    sentinel_text: str = field(default_factory=lambda: f"SENTINEL-{secrets.token_hex(12)}")
    sentinels: list[str] = field(default_factory=list)

    def victim_command(self) -> str:
        """Shell the victim slot runs: its marker file in its workspace."""
        return f"printf %s {shlex.quote(self.marker_text)} > {shlex.quote(self.marker_name)}"

    def guessed_paths(self) -> list[str]:
        slot, name = self.victim_slot, self.marker_name
        tops = {self.data_dir, "/data", "/run/atropos/data", "/alloc/data", "/local/data"}
        guesses = [f"{top}/slots/{slot}/{name}" for top in sorted(tops)]
        guesses += [f"{top}/token" for top in sorted(tops)] + ["/run/atropos/token", "/secrets/token"]
        guesses += [f"../{slot}/{name}", f"/workspace/../{slot}/{name}", f"/workspace/../../slots/{slot}/{name}"]
        guesses += [
            os.path.join(package_dir(), "envs", "tasks", TASKS_FILE),
            f"/opt/*/lib/python3*/site-packages/atropos/envs/tasks/{TASKS_FILE}",
            f"/usr/local/lib/python3*/*-packages/atropos/envs/tasks/{TASKS_FILE}",
            f"{REPO}/atropos/envs/tasks/{TASKS_FILE}",
        ]
        return guesses + self.sentinels

    def attack(self) -> str:
        """Shell the attacker slot runs; prints `LEAK <what>:<path>` for each secret it read."""
        needles = {
            "marker": self.marker_text,
            "sentinel": self.sentinel_text,
            "hidden-check": HIDDEN_CHECK_TEXT,
            "token": self.token,
        }
        names = [self.marker_name, f"{SENTINEL_PREFIX}*", TASKS_FILE, HIDDEN_CHECK, "token", "server.lock"]
        name_test = " -o ".join(f"-name {shlex.quote(n)}" for n in names)
        check = "\n".join(
            f'  grep -qsF -- {shlex.quote(text)} "$f" && echo "LEAK {what}:$f"' for what, text in needles.items()
        )
        guesses = " ".join(shlex.quote(g) if "*" not in g else g for g in self.guessed_paths())
        return "\n".join(
            [
                "{",
                f"  find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f \\( {name_test} \\) "
                "-print 2>/dev/null",
                f'  for f in {guesses}; do [ -f "$f" ] && echo "$f"; done',
                "} | sort -u | while IFS= read -r f; do",
                check,
                "done",
                f"ls {shlex.quote(self.data_dir)}/slots >/dev/null 2>&1 && echo LEAK data-dir:{self.data_dir}",
                "true",
            ]
        )


def leaked(output: str) -> list[str]:
    return sorted({line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("LEAK ")})


def leaked_kinds(output: str) -> set[str]:
    return {what.split(":", 1)[0] for what in leaked(output)}


@contextmanager
def planted(victim_slot: int, data_dir: str, token: str) -> Iterator[Secrets]:
    """Secrets for one attack, with a world-readable sentinel file in each dir of SENTINEL_DIRS this
    process can write (removed afterwards)."""
    found = Secrets(victim_slot, data_dir, token)
    for folder in SENTINEL_DIRS:
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            continue
        path = os.path.join(folder, f"{SENTINEL_PREFIX}{secrets.token_hex(4)}.txt")
        with open(path, "w", encoding="ascii") as fh:
            fh.write(found.sentinel_text + "\n")
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        found.sentinels.append(path)
    try:
        yield found
    finally:
        for path in found.sentinels:
            os.unlink(path)


def host_data_dir(marker_name: str, roots: list[str]) -> str:
    """The data dir holding a slot's marker file, found from the node (DATA/slots/N/marker)."""
    for root in roots:
        for top, _dirs, files in os.walk(root):
            if marker_name in files and os.path.basename(os.path.dirname(top)) == "slots":
                return os.path.dirname(os.path.dirname(top))
    raise AssertionError(f"no slot workspace holds {marker_name} under {roots}")


async def attack_through_pool(
    pool: SlotPool, roots: list[str], seen_as: str | None = None, image: str | None = None
) -> tuple[Secrets, str]:
    """Two slots of one server (released after): the victim writes its marker, the attacker runs the attack. `roots`
    are node dirs that hold the server's data dir; `seen_as` is the data dir's path in the server
    (a container's /data) where it is not the node's; `image`: both slots in that task image."""
    victim = await pool.acquire("fs-victim", image=image)
    attacker = await pool.acquire("fs-attacker", image=image)
    assert victim.server_id == attacker.server_id and victim.index != attacker.index
    probe = Secrets(victim.index, "", pool.server_of(attacker).token)
    assert (await pool.execute(victim, "bash", {"command": probe.victim_command()})).ok
    data_dir = seen_as or host_data_dir(probe.marker_name, roots)
    with planted(victim.index, data_dir, probe.token) as found:
        found.marker_name, found.marker_text = probe.marker_name, probe.marker_text
        result = await pool.execute(attacker, "bash", {"command": found.attack()}, timeout=300)
    pool.release(victim)
    pool.release(attacker)
    assert result.exit_code == 0, result.output
    return found, result.output
