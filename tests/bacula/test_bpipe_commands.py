"""``ahvbackup bpipe backup|restore`` and ``ahvbackup bacula fileset`` as bpipe runs them (as
programs, stdout/stdin as the pipe), against a served simulator; and chain restores with
hand-made incremental streams."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from tests.e2e.e2e_world import MiB, World, same_as_sim

from ahvbackup.bacula.apply import StreamApplier, chain_file
from ahvbackup.core.errors import StreamFormatError, TargetError
from ahvbackup.core.stream import StreamHeader, StreamWriter
from ahvbackup.targets.raw import RawTarget

AHVBACKUP = Path(sys.executable).with_name("ahvbackup")


def write_config(world: World, path: Path, **extra: str) -> Path:
    """An ahvbackup.conf for the simulator world (mode 0600: it holds a password)."""
    keys = {**world.overrides(), **extra}
    keys.pop("repository")
    text = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


async def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    def go() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(AHVBACKUP), *args], input=stdin, capture_output=True,
                              timeout=120, check=False)

    return await trio.to_thread.run_sync(go)


async def test_bpipe_reader_and_writer_round_trip(world: World, tmp_path: Path) -> None:
    vm = world.add_vm("pvm", [(8 * MiB, [(MiB, 2 * MiB)]), (4 * MiB, [(0, 4 * MiB)])])
    conf = write_config(world, tmp_path / "ahvbackup.conf")
    for i, label in enumerate(["scsi.0", "scsi.1"]):
        backup = await run("bpipe", "backup", "-c", str(conf), "--vm", "pvm", "--disk", label)
        assert backup.returncode == 0, backup.stderr.decode()
        assert f"backed up pvm {label}: level=full" in backup.stderr.decode()
        restore = await run("bpipe", "restore", "-c", str(conf), "--where",
                            str(tmp_path / "out"), stdin=backup.stdout)
        assert restore.returncode == 0, restore.stderr.decode()
        assert f"restored pvm {label} (full)" in restore.stdout.decode()
        assert same_as_sim(world.sim, vm.uuid, i, tmp_path / "out" / "pvm" / f"{label}.raw")
    # each disk's own job keeps its snapshot as that disk's next reference; nothing else stays
    assert len(world.sim.snapshots) == 2
    assert world.sim.images == {}


async def test_a_failing_reader_exits_non_zero_with_a_message(world: World,
                                                              tmp_path: Path) -> None:
    world.add_vm("fvm", [(4 * MiB, [(0, MiB)])])
    conf = write_config(world, tmp_path / "ahvbackup.conf")
    no_disk = await run("bpipe", "backup", "-c", str(conf), "--vm", "fvm", "--disk", "scsi.7")
    assert no_disk.returncode != 0
    assert "has no disk scsi.7" in no_disk.stderr.decode()
    assert no_disk.stdout == b""
    no_vm = await run("bpipe", "backup", "-c", str(conf), "--vm", "ghost", "--disk", "scsi.0")
    assert no_vm.returncode != 0
    assert "ghost" in no_vm.stderr.decode()
    pattern = await run("bpipe", "backup", "-c", str(conf), "--vm", "f*", "--disk", "scsi.0")
    assert pattern.returncode != 0
    assert "name exactly one VM" in pattern.stderr.decode()
    world.sim.faults.add(method="GET", path=r"/images/.*/file", drop=True, count=10_000)
    cut = await run("bpipe", "backup", "-c", str(conf), "--vm", "fvm", "--disk", "scsi.0")
    assert cut.returncode != 0
    assert "backup of fvm scsi.0 failed" in cut.stderr.decode()
    assert world.sim.snapshots == {} and world.sim.images == {}


async def test_the_writer_refuses_a_truncated_stream_and_leaves_nothing(
        world: World, tmp_path: Path) -> None:
    world.add_vm("tvm", [(4 * MiB, [(0, 3 * MiB)])])
    conf = write_config(world, tmp_path / "ahvbackup.conf")
    backup = await run("bpipe", "backup", "-c", str(conf), "--vm", "tvm", "--disk", "scsi.0")
    assert backup.returncode == 0, backup.stderr.decode()
    restore = await run("bpipe", "restore", "-c", str(conf), "--where", str(tmp_path / "out"),
                        stdin=backup.stdout[: len(backup.stdout) // 2])
    assert restore.returncode != 0
    assert "truncated" in restore.stderr.decode()
    assert not list((tmp_path / "out").rglob("*.raw"))


async def test_fileset_prints_one_plugin_line_per_disk(world: World, tmp_path: Path) -> None:
    world.add_vm("web", [(4 * MiB, []), (4 * MiB, [])])
    world.add_vm("db", [(4 * MiB, [])])
    conf = write_config(world, tmp_path / "ahvbackup.conf")
    out = await run("bacula", "fileset", "-c", str(conf), "-o", "vm=web,db",
                    "--jobdefs", "Nightly", "--command", "/usr/bin/ahvbackup")
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    plugins = [line.strip() for line in text.splitlines() if "Plugin =" in line]
    assert len(plugins) == 3
    web = next(v for v in world.sim.vms.values() if v.name == "web")
    cluster = next(iter(world.sim.clusters.values())).name
    web0 = next(p for p in plugins if "/web/disks/scsi.0.ahvd:" in p)
    assert web0 == (
        f'Plugin = "bpipe:/@ahvbackup/{cluster}/web/disks/scsi.0.ahvd:/usr/bin/ahvbackup bpipe '
        f"backup -c {conf} --vm {web.uuid} --disk scsi.0:/usr/bin/ahvbackup bpipe restore "
        f'-c {conf} --where %w"')
    assert 'Name = "ahv-web"' in text and 'JobDefs = "Nightly"' in text
    meta = await run("bacula", "fileset", "-c", str(conf), "-o", "vm=db", "--path",
                     "metaplugin")
    assert 'Plugin = "ahvbackup: vm=db"' in meta.stdout.decode()


# chains, with streams made by hand (the job engine's incrementals are not needed) ------------

SIZE = 1 << 20


def stream(kind: str, backup_id: str, writes: dict[int, bytes], *, ref: str = "",
           vm_name: str = "chainvm", label: str = "scsi.0") -> bytes:
    out = io.BytesIO()
    header = StreamHeader(kind=kind, vm_uuid="vm-1", vm_name=vm_name, disk_uuid="d-1",
                          disk_label=label, disk_bus="scsi", disk_size=SIZE,
                          snapshot_id=f"snap-{backup_id}", backup_id=backup_id,
                          reference_snapshot_id=f"snap-{ref}" if ref else "",
                          reference_backup_id=ref)
    with StreamWriter(out, header) as w:
        for offset, data in sorted(writes.items()):
            w.write_chunk(offset, data)
    return out.getvalue()


def apply(dest: Path, data: bytes, *, piece: int = 1000) -> Path:
    async def run() -> Path:
        applier = StreamApplier(target=RawTarget(None), dest=dest, name="test")
        for start in range(0, len(data), piece):  # arbitrary piece sizes, like D packets
            await applier.feed(data[start : start + piece])
        out = await applier.finish()
        assert out.path is not None
        return out.path

    return trio.run(run)


def test_a_chain_applies_in_order_and_refuses_out_of_order(tmp_path: Path) -> None:
    full = stream("full", "b1", {0: b"A" * 4096, 8192: b"B" * 4096})
    inc1 = stream("incremental", "b2", {0: b"C" * 4096, 65536: b"D" * 4096}, ref="b1")
    inc2 = stream("incremental", "b3", {8192: bytes(4096)}, ref="b2")
    with pytest.raises(TargetError, match="no restored full to apply it to"):
        apply(tmp_path, inc1)
    image = apply(tmp_path, full)
    with pytest.raises(TargetError, match=r"applies on top of backup b2, but .* holds b1"):
        apply(tmp_path, inc2)
    assert image.exists()  # a refused stream leaves the earlier point alone
    apply(tmp_path, inc1)
    apply(tmp_path, inc2)
    want = bytearray(SIZE)
    want[0:4096] = b"C" * 4096
    want[65536:69632] = b"D" * 4096
    assert image.read_bytes() == bytes(want)
    assert json.loads(chain_file(image).read_text())["backup_ids"] == ["b1", "b2", "b3"]


def test_a_damaged_incremental_removes_the_image(tmp_path: Path) -> None:
    image = apply(tmp_path, stream("full", "b1", {0: b"A" * 4096}))
    inc = bytearray(stream("incremental", "b2", {0: b"C" * 4096}, ref="b1"))
    inc[-200] ^= 0xFF
    with pytest.raises(StreamFormatError):
        apply(tmp_path, bytes(inc))
    assert not image.exists()


async def test_sink_bacula_outside_a_bacula_job_says_where_it_works(world: World,
                                                                    tmp_path: Path) -> None:
    world.add_vm("svm", [(4 * MiB, [(0, MiB)])])
    out = await run("backup", *world.cli_args(vm="svm", sink="bacula"))
    assert out.returncode != 0
    assert "sink=bacula works only inside a Bacula job" in out.stdout.decode() + \
        out.stderr.decode()
    assert world.sim.images == {}


@pytest.mark.parametrize("vm_name", ["../../../../escaped", "/tmp/abs", "a/../../b"])
async def test_the_writer_keeps_a_hostile_vm_name_inside_where(tmp_path: Path,
                                                               vm_name: str) -> None:
    # the stream's own header names the VM: a Prism user could have named it anything
    where = tmp_path / "deep" / "where"
    data = stream("full", "b1", {0: b"A" * 4096}, vm_name=vm_name, label="../scsi.0")
    restore = await run("bpipe", "restore", "--where", str(where), "-o", "debug_log=",
                        "-o", f"state_dir={tmp_path / 'state'}", stdin=data)
    assert restore.returncode == 0, restore.stderr.decode()
    images = list(where.rglob("*.raw"))
    assert len(images) == 1
    assert images[0].resolve().parent.parent == where.resolve()
    assert images[0].read_bytes()[:4096] == b"A" * 4096
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and where not in p.parents]
    assert outside == []
