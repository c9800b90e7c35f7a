"""The real-Bacula lab: Debian's Director, Storage and File daemons on loopback.

Debian 12 ships Bacula 9.6.7, whose file daemon has bpipe but no metaplugin, so the lab is
proven here with a bpipe FileSet; the metaplugin backend's conformance is in
test_bacula_backend.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from lab import BaculaLab
from tests.conftest import require_peer

PROGRAMS = ("bacula-dir", "bacula-sd", "bacula-fd", "bconsole")


@pytest.mark.peer
def test_bpipe_full_backup_and_restore_round_trip(tmp_path: Path) -> None:
    programs = require_peer(*PROGRAMS)
    src = tmp_path / "data" / "src.raw"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3_000_000))
    restore = tmp_path / "lab" / "restore"
    plugin = f"bpipe:/@bpipe/lab/stream.raw:/bin/cat {src}:/bin/sh -c 'cat > %w/stream.raw'"
    lab = BaculaLab(root=tmp_path / "lab", programs=programs, filesets={"bpipe-lab": plugin})
    started = time.monotonic()
    with lab:
        backup = lab.run_job("run job=bpipe-lab level=Full yes")
        assert (backup.status, backup.errors) == ("T", 0), lab.job_log()
        assert backup.files == 1
        assert backup.bytes >= src.stat().st_size

        job = lab.run_job(f"restore jobid={backup.job_id} client=lab-fd "
                          f"restoreclient=lab-fd where={restore} all done yes")
        assert (job.status, job.errors) == ("T", 0), lab.job_log()
        assert (restore / "stream.raw").read_bytes() == src.read_bytes()
    assert all(p.poll() is not None for p in lab.procs.values()), "a daemon outlived the lab"
    print(f"bacula lab round trip: {time.monotonic() - started:.1f} s")
