"""A kill at every step of a DR delta push (`ahvbackup dr push`), as test_kill_matrix.py does
for backups: SIGKILL the source at each hook event in turn, then push again. The next push must
succeed and leave only the snapshot of the last acknowledged point on the cluster, and the
receiver's newest point must be the VM's disks as they are: a killed push never lists a point."""

from __future__ import annotations

import json
import random

from tests.e2e.e2e_world import MiB, World
from tests.e2e.test_dr_cli import (
    disks_now,
    only_dr_references_left,
    psk,
    receiver_proc,
    running,
    scribble,
    source,
)
from tests.e2e.test_kill_matrix import Record, _run, _site


async def test_a_kill_at_every_step_of_a_dr_push_is_healed_by_the_next(
        world: World, record_property: Record) -> None:
    sizes = [4 * MiB, MiB]
    vm = world.add_vm("dr-k", [(sizes[0], [(0, MiB)]), (sizes[1], [(0, 256 << 10)])])
    rng = random.Random(7)
    channel = psk()
    rx = receiver_proc(world.tmp, "rx", channel)
    site = _site(world.tmp)
    async with running(rx):
        src = source(world, "dr-k", rx, channel)
        await src.ok("seed")
        args = ["dr", "push", "-c", str(src.conf),
                *world.cli_args(vm="dr-k", data_path="rest", chunk_size_mib=1)]
        events = world.tmp / "events.jsonl"
        scribble(world, vm.uuid, sizes, rng)
        assert await _run(world, site, *args, KILL_EVENTS=str(events)) == 0
        steps = [tuple(json.loads(line)[:2]) for line in events.read_text().splitlines()]
        assert {name for name, _ in steps} >= {"resource_created", "snapshot_created"}, steps
        for name, n in steps:
            scribble(world, vm.uuid, sizes, rng)
            points = rx.points(vm.uuid)
            code = await _run(world, site, *args, KILL_AT=f"{name}:{n}")
            assert code == -9, f"the kill at {name}:{n} did not happen (exit {code!r})"
            assert rx.points(vm.uuid)[-1] <= points[-1] + 1  # at most the point it finished
            code = await _run(world, site, *args)
            assert code == 0, f"the push after a kill at {name}:{n}: {code!r}"
            only_dr_references_left(world)
            newest = rx.points(vm.uuid)[-1]
            assert [rx.image(vm.uuid, newest, d.uuid) for d in vm.disks] == \
                disks_now(world, vm.uuid, sizes), f"after a kill at {name}:{n}"
        record_property("killed", f"{len(steps)} steps of a DR push: "
                        + ", ".join(f"{name}:{n}" for name, n in steps))
