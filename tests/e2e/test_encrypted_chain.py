"""Encryption at rest through the directory repository: a chain (full plus incrementals,
compressed and not) made across a key rotation restores byte-identical with the current and
the old key file; without the old key, or with none, the restore fails naming the key id and
leaves nothing behind; verify without a key checks what it can and says so; no key material
is logged, even at verbose=3."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio
from tests.e2e.e2e_world import MiB, World

from ahvbackup.core.errors import ConfigError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.consolidate import ConsolidateJob
from ahvbackup.core.jobs.restore import RestoreJob, VerifyJob, pick_backup
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.log import TRACE
from ahvbackup.core.repository import stream_name
from ahvbackup.core.stream import StreamKey, StreamReader

CLI = [sys.executable, "-m", "ahvbackup.core.cli"]
TEXT = b"".join(b"%07d GET /api/nutanix/v3/vms/%04d 200 %d bytes\n" % (i, i % 1000, i * 13)
                for i in range(40000))[: MiB]


def _key_file(tmp: Path, name: str) -> tuple[Path, str]:
    path = tmp / name
    secret = os.urandom(32)
    path.write_text(secret.hex() + "\n")
    path.chmod(0o600)
    return path, secret.hex()


async def _backup(world: World, level: str, **keys: object) -> str:
    rt = Runtime.from_config(world.config(vm="enc", level=level, chunk_size_mib=1, **keys))
    result = await BackupJob(rt).run()
    assert result.ok, result.failed
    backup_id = result.vms[0].backup_id
    assert backup_id is not None
    return backup_id


async def test_an_encrypted_chain_restores_across_a_key_rotation_and_names_missing_keys(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(TRACE)
    old, old_hex = _key_file(world.tmp, "tenant-2025.key")
    new, new_hex = _key_file(world.tmp, "tenant-2026.key")
    old_id = StreamKey(bytes.fromhex(old_hex)).key_id
    new_id = StreamKey(bytes.fromhex(new_hex)).key_id
    vm = world.add_vm("enc", [(8 * MiB, [(0, 2 * MiB)])])
    world.sim.write_disk(vm.uuid, 0, 3 * MiB, TEXT)

    ids = [await _backup(world, "full", encryption_key=old)]  # compression=auto: zstd
    world.sim.write_disk(vm.uuid, 0, 5 * MiB + 4096, os.urandom(300_000))
    world.sim.zero_disk(vm.uuid, 0, 0, 65536)
    ids.append(await _backup(world, "incremental", encryption_key=old, compression="none"))
    world.sim.write_disk(vm.uuid, 0, 6 * MiB, TEXT[: MiB // 2])  # then the key is rotated
    # this one through the CLI at verbose=3 with a debug log: no key may be in any log
    debug = world.tmp / "debug.log"
    cli = await trio.run_process(
        [*CLI, "-vvv", "--json", "backup",
         *world.cli_args(vm="enc", level="incremental", chunk_size_mib=1, debug_log=debug,
                         encryption_key=new, encryption_old_keys=old, compression="zstd:3")],
        capture_stdout=True, capture_stderr=True, check=False)
    assert cli.returncode == 0, cli.stderr.decode()[-2000:]
    ids.append(json.loads(cli.stdout)["vms"][0]["backup_id"])
    image = world.sim.read_disk(vm.uuid, 0, 0, 8 * MiB)

    repo = world.tmp / "repo" / vm.uuid
    streams = [repo / i / stream_name("scsi.0") for i in ids]
    headers = []
    for path in streams:
        with path.open("rb") as f:
            headers.append(StreamReader(f).header)
        assert TEXT[:4096] not in path.read_bytes()  # neither plain nor merely compressed
    assert [(h.key_id, h.compression) for h in headers] == [
        (old_id, "zstd"), (old_id, "none"), (new_id, "zstd")]
    assert streams[0].stat().st_size < 2 * MiB + MiB // 2  # the text compressed

    both = Runtime.from_config(world.config(vm="enc", encryption_key=new,
                                            encryption_old_keys=old))
    tip = await pick_backup(both, vm="enc", backup_id=None)
    done = await RestoreJob(both, tip, dest=world.tmp / "ok").run()
    assert done.ok, done.to_json()
    assert done.disks[0].chain == ids
    assert Path(done.disks[0].path).read_bytes() == image

    for keys, said in (({"encryption_key": new}, f"key id {old_id}, which none of the keys "
                        f"has: {new_id} ({new})"),
                       ({}, f"encrypted with key id {old_id} and no key is configured")):
        rt = Runtime.from_config(world.config(vm="enc", **keys))
        dest = world.tmp / f"fail{len(keys)}"
        failed = await RestoreJob(rt, tip, dest=dest).run()
        assert not failed.ok
        error = failed.disks[0].error or ""
        assert said in error and "\n" not in error
        assert not (dest / "enc" / "scsi.0.raw").exists()

    # consolidation opens the chain with both keys and seals the synthetic full anew
    done = await ConsolidateJob(both, tip).run()
    assert done.ok, done
    with streams[2].open("rb") as f:
        synthetic = StreamReader(f).header
    assert (synthetic.kind, synthetic.key_id) == ("full", new_id)
    assert synthetic.wrapped_key != headers[2].wrapped_key  # a data key of its own
    tip = await pick_backup(both, vm="enc", backup_id=None)
    again = await RestoreJob(both, tip, dest=world.tmp / "again").run()
    assert again.ok and Path(again.disks[0].path).read_bytes() == image

    keyless = Runtime.from_config(world.config(vm="enc"))
    checked = await VerifyJob(keyless, tip).run()
    assert checked.ok, checked.to_json()
    assert f"verified without its key: encrypted with key id {new_id}" in caplog.text
    assert checked.disks[0].chain == [ids[2]]  # the consolidated full
    assert "AES-GCM tags" in caplog.text

    logged = [caplog.text, debug.read_text(), cli.stdout.decode(), cli.stderr.decode()]
    assert f"aes-256-gcm key id {new_id}" in logged[1]  # the debug log names keys by id
    for text in logged:
        for secret in (old_hex, new_hex):
            assert secret not in text and secret.upper() not in text


async def test_encryption_key_with_the_bacula_sink_is_refused_by_name(world: World) -> None:
    key, _ = _key_file(world.tmp, "k.key")
    with pytest.raises(ConfigError, match="command line: encryption_key: streams are encrypted "
                       "only in the directory repository; sink=bacula does not encrypt"):
        world.config(vm="x", sink="bacula", encryption_key=key)
