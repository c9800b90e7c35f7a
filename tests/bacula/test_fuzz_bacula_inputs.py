"""Fuzzing the Bacula inputs, with hypothesis: whole metaplugin restore sessions (the packets a
file daemon sends, carrying a real backup's files) mutated, truncated, reordered and oversized,
fed to the backend's session in this process; and a bpipe writer's stdin, mutated.

What must hold for every example: the session ends (no hang) with a named error, not a crash
(no "internal error" packet, nothing escapes `Session.run`); a restored image that is there
is byte-identical to the disk that was backed up, and nothing half-made is left (no partial
image, no spool); when an image is missing, the job log or the exit status says so. The bpipe
writer exits non-zero with one line and leaves nothing.

`make test` runs a bounded number of examples; for a longer run:
``AHVBACKUP_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q
tests/bacula/test_fuzz_bacula_inputs.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bacula_sink_stream import RecordingEmitter
from tests.e2e.e2e_world import MiB, World

from ahvbackup.bacula.apply import StreamApplier, apply_stream
from ahvbackup.bacula.bpipe import WRITER_VIEW
from ahvbackup.bacula.channel import PacketChannel
from ahvbackup.bacula.job_handlers import JobHandlers
from ahvbackup.bacula.protocol import MAX_PAYLOAD, encode_header
from ahvbackup.bacula.session import Session
from ahvbackup.bacula.sink import BaculaSink
from ahvbackup.core.config import Config, ConfigSources, assemble_config
from ahvbackup.core.drivers import RestoreTarget
from ahvbackup.core.errors import AhvBackupError
from ahvbackup.core.jobs.backup import BackupJob
from ahvbackup.core.jobs.runtime import Runtime
from ahvbackup.core.plugins import Hooks, load_driver

EXAMPLES = int(os.environ.get("AHVBACKUP_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
#: a session that has not ended by then hangs
SESSION_SECONDS = 20.0
AHVBACKUP = Path(sys.executable).with_name("ahvbackup")


@dataclass
class Backed:
    files: list[tuple[str, bytes]]  # (virtual file name, its data), in the job's order
    disks: dict[str, bytes]  # label -> the disk's bytes when it was backed up


async def _backup(world: World) -> Backed:
    vm = world.add_vm("fz", [(MiB, [(0, 256 * 1024), (768 * 1024, 64 * 1024)])])
    rt = Runtime.from_config(world.config(sink="bacula", vm="fz", chunk_size_mib="1"))
    emitter = RecordingEmitter()
    sink = rt.sink
    assert isinstance(sink, BaculaSink)
    sink.attach_emitter(emitter, path_of=lambda *p: "/@ahvbackup/" + "/".join(p),
                        messages=emitter)
    result = await BackupJob(rt).run()
    assert result.ok, result.to_json()
    return Backed(files=[(f.fname, f.data) for f in emitter.files],
                  disks={"scsi.0": world.sim.read_disk(vm.uuid, 0, 0, MiB)})


# the packets of one restore session, as a file daemon sends them ------------------------

def _c(text: str | bytes) -> bytes:
    body = text.encode() if isinstance(text, str) else text
    return encode_header("C", len(body) + 1) + body + b"\n"


def _block(name: str, lines: list[str]) -> list[bytes]:
    return [_c(name), *(_c(x) for x in lines), encode_header("F", 0)]


def restore_packets(backed: Backed, where: Path, params: list[str]) -> list[bytes]:
    """Job, Params, RestoreStart, every file (FNAME, STAT, TSTAMP, DATA and its D packets),
    FINISH, END, T: one packet per item."""
    out = [*_block("Job", ["Name=fuzz", "JobID=7", "Type=R", "Level=F", f"Where={where}"]),
           *_block("Params", params), _c("RestoreStart")]
    for fname, data in backed.files:
        out += [_c(f"FNAME:{where}{fname}"), _c(f"STAT:F {len(data)} 0 0 100640 1"),
                _c("TSTAMP:0 0 0"), encode_header("F", 0), _c("DATA")]
        for at in range(0, len(data), 256 * 1024):  # several D packets per stream
            piece = data[at : at + 256 * 1024]
            out.append(encode_header("D", len(piece)) + piece)
        out.append(encode_header("F", 0))
    return [*out, _c("FINISH"), _c("END"), encode_header("T", 0)]


# mutations: of whole packets (reorder, drop, repeat, oversize) and of bytes ------------

packet_op = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 10_000)),
    st.tuples(st.just("repeat"), st.integers(0, 10_000)),
    st.tuples(st.just("swap"), st.integers(0, 10_000)),
    st.tuples(st.just("oversize"), st.integers(0, 10_000)),
)
byte_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 40)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 30), st.just(0)),
)


def _mutate_packets(packets: list[bytes], ops: list[tuple[str, int]]) -> list[bytes]:
    out = list(packets)
    for op, at in ops:
        i = at % len(out)
        if op == "drop":
            del out[i]
        elif op == "repeat":
            out.insert(i, out[i])
        elif op == "swap" and i + 1 < len(out):
            out[i], out[i + 1] = out[i + 1], out[i]
        elif op == "oversize":  # a command or data packet as large as a packet can be
            kind = out[i][:1].decode()
            fill = b"A" * (MAX_PAYLOAD - 1) + b"\n" if kind == "C" else os.urandom(MAX_PAYLOAD)
            out[i] = encode_header("D" if kind == "D" else "C", MAX_PAYLOAD) + fill
        if not out:
            break
    return out


def _mutate_bytes(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for op, where, arg in ops:
        at = where % (len(buf) + 1)
        if op == "flip" and at < len(buf):
            buf[at] ^= int(arg)  # type: ignore[call-overload]
        elif op == "insert":
            buf[at:at] = arg  # type: ignore[index]
        elif op == "delete":
            del buf[at : at + int(arg)]  # type: ignore[call-overload]
        elif op == "cut":
            del buf[at:]
    return bytes(buf)


# running one session in this process ----------------------------------------------------

@dataclass
class Outcome:
    code: int
    sent: list[tuple[str, bytes]]  # what the backend answered: (type, payload)

    def said(self, kinds: str) -> list[str]:
        return [p.decode(errors="replace") for k, p in self.sent if k in kinds]


def _packets_of(raw: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos + 8 <= len(raw):
        kind, length = chr(raw[pos]), int(raw[pos + 1 : pos + 7])
        out.append((kind, raw[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    assert pos == len(raw), "the backend sent a torn packet"
    return out


def run_session(data: bytes) -> Outcome:
    """One backend session (real job handlers) fed `data`, then the end of its input."""

    async def main() -> Outcome:
        to_backend_tx, to_backend_rx = trio.testing.memory_stream_one_way_pair()
        from_backend_tx, from_backend_rx = trio.testing.memory_stream_one_way_pair()
        session = Session(PacketChannel(to_backend_rx, from_backend_tx), JobHandlers(),
                          plugin="ahvbackup", api="3")
        received = bytearray()

        async def feed() -> None:
            for at in range(0, len(data), 65536):
                await to_backend_tx.send_all(data[at : at + 65536])
            await to_backend_tx.aclose()  # the file daemon goes away

        async def drain() -> None:
            while chunk := await from_backend_rx.receive_some():
                received.extend(chunk)

        with trio.fail_after(SESSION_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                nursery.start_soon(drain)
                code = await session.run()
                await from_backend_tx.aclose()
        return Outcome(code=code, sent=_packets_of(bytes(received)))

    return trio.run(main)


def _left(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def check_outcome(out: Outcome, *, where: Path, work: Path, backed: Backed,
                  finish_sent: bool = True) -> None:
    crashes = [m for m in out.said("AEQ") if "internal error" in m]
    assert not crashes, crashes
    images = [p for p in _left(where) if p.suffix == ".raw"]
    for image in images:  # an image left there is whole and right, whatever its name
        assert image.read_bytes() in backed.disks.values(), f"{image} is not a disk backed up"
    # (a file whose name the fuzzer changed is restored as a plain file, as Bacula sent it)
    partial = [p for p in _left(where) if ".partial-" in p.name]
    assert not partial, f"left behind: {partial}"
    assert not list(work.glob("ahvbackup-restore-*")), "the restore spool was left behind"
    # an image missing is reported, never silent (when the file daemon went away before
    # FINISH, nothing was asked of the restore and nobody is left to tell)
    if len(images) < len(backed.disks) and finish_sent:
        assert out.code != 0 or out.said("AEQ"), out.sent


def _params(tmp: Path) -> list[str]:
    return [f"state_dir={tmp / 'state'}", f"working_dir={tmp / 'work'}", "debug_log=",
            "verbose=0"]


async def test_mutated_restore_sessions_fail_by_name_and_leave_nothing_half_restored(
        world: World, tmp_path: Path) -> None:
    backed = await _backup(world)
    counter = iter(range(1 << 30))

    def fresh() -> tuple[Path, Path, list[bytes]]:
        case = tmp_path / f"case{next(counter)}"
        return case / "restore", case / "work", restore_packets(backed, case / "restore",
                                                                 _params(case))

    # the unmutated session restores the disk: the fuzzing starts from a working session
    where, _, packets = fresh()
    out = await trio.to_thread.run_sync(run_session, b"".join(packets))
    images = [p for p in _left(where) if p.suffix == ".raw"]
    assert out.code == 0 and [p.read_bytes() for p in images] == [backed.disks["scsi.0"]], \
        out.sent

    # the file daemon gone in the middle of the job, a whole stream received (spooled) but
    # no FINISH: nothing restored, nothing left (on main the spool stayed behind)
    where, work, packets = fresh()
    first_data = packets.index(_c("DATA"))
    cut = next(i for i in range(first_data, len(packets)) if packets[i][:1] == b"F")
    out = await trio.to_thread.run_sync(run_session, b"".join(packets[:cut]))
    assert out.code == 1 and not [p for p in _left(where) if p.suffix == ".raw"]
    check_outcome(out, where=where, work=work, backed=backed)

    @FUZZ
    @given(st.lists(packet_op, max_size=3), st.lists(byte_op, max_size=3))
    def fuzz(packet_ops: list[tuple[str, int]], byte_ops: list[tuple[str, int, object]]) -> None:
        where, work, packets = fresh()
        data = _mutate_bytes(b"".join(_mutate_packets(packets, packet_ops)), byte_ops)
        check_outcome(run_session(data), where=where, work=work, backed=backed,
                      finish_sent=_c("FINISH") in data)

    await trio.to_thread.run_sync(fuzz)


# bpipe restore: the writer's stdin ------------------------------------------------------

def _apply(stream: bytes, dest: Path) -> None:
    """What ``ahvbackup bpipe restore`` does with its stdin (`apply_stream`), in this process."""

    async def main() -> None:
        cfg = _raw_config(dest)
        target = load_driver("target", cfg.target, base=RestoreTarget)(cfg)
        applier = StreamApplier(target=target, dest=dest, name="stream on stdin")
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            piece = stream[pos : pos + n]
            pos += len(piece)
            return piece

        await apply_stream(applier, read)

    trio.run(main)


def _raw_config(dest: Path) -> Config:
    return assemble_config(ConfigSources(overrides={"where": str(dest)}), hooks=Hooks(),
                           view=WRITER_VIEW)


async def test_a_mutated_bpipe_stream_is_refused_by_name_and_leaves_nothing(
        world: World, tmp_path: Path) -> None:
    backed = await _backup(world)
    (stream,) = [data for fname, data in backed.files if fname.endswith(".ahvd")]
    counter = iter(range(1 << 30))

    @FUZZ
    @given(st.lists(byte_op, min_size=1, max_size=3))
    def fuzz(ops: list[tuple[str, int, object]]) -> None:
        data = _mutate_bytes(stream, ops)
        dest = tmp_path / f"case{next(counter)}"
        try:
            _apply(data, dest)
        except AhvBackupError:
            assert not _left(dest), f"left behind: {_left(dest)}"
        else:  # accepted: only when the stream is still the one backed up
            (image,) = [p for p in _left(dest) if p.suffix == ".raw"]
            assert image.read_bytes() == backed.disks["scsi.0"]

    await trio.to_thread.run_sync(fuzz)

    # the command itself: exit status 1, one line naming the damage, nothing left
    dest = tmp_path / "cli"
    damaged = stream[: len(stream) // 2]
    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        [str(AHVBACKUP), "bpipe", "restore", "--where", str(dest), "-o", "debug_log=",
         "-o", f"state_dir={tmp_path / 'state'}"],
        input=damaged, capture_output=True, timeout=60))
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "Traceback" not in lines[0], lines
    assert not _left(dest), _left(dest)



def test_an_oversized_command_is_refused_in_one_short_line() -> None:
    # on main the refusal quoted the whole command: an A packet larger than a packet may be,
    # and the backend died of the ValueError instead
    out = run_session(_c(b"A" * (MAX_PAYLOAD - 1)))
    (refusal,) = out.said("A")
    assert out.code == 1 and "unknown command 'AAAA" in refusal and len(refusal) < 400, refusal
