"""The cluster a restore target works on: one place opens it for every restore entry point.

A target that creates things on a cluster (`RestoreTarget.needs_cluster`) gets a hypervisor
session and a release stack on the job's ledger (`ClusterAccess`). Before it is handed out,
what a killed earlier job left is swept (``job_cleanup_on_abort``), so a SIGKILL followed by
the next run leaves nothing. The CLI restore, the metaplugin backend and the bpipe writer all
open it here.
"""

from __future__ import annotations

__all__ = ["cluster_for"]

import contextlib
from collections.abc import AsyncIterator

from ..drivers import ClusterAccess, RestoreTarget
from ..ledger import ReleaseStack
from .runtime import Runtime


@contextlib.asynccontextmanager
async def cluster_for(rt: Runtime, target: RestoreTarget) -> AsyncIterator[ClusterAccess | None]:
    """The `ClusterAccess` for `target`'s `begin_vm`, or None for a target that needs none.

    Leaving the context releases what is still on the stack (in reverse order, shielded) and
    closes the session: everything a target did not hand over at `commit`."""
    if not target.needs_cluster:
        yield None
        return
    async with rt.hypervisor.connect() as session:
        if rt.config.job_cleanup_on_abort:  # what a killed restore left
            await rt.sweep(session)
        async with ReleaseStack(rt.ledger, owner=rt.job_id, releaser=session.release) as stack:
            yield ClusterAccess(session=session, stack=stack)
