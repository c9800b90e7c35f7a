"""``ahvbackup simulator serve``: run the Prism simulator until interrupted."""

from __future__ import annotations

__all__ = ["simulator"]

import signal
from pathlib import Path
from typing import Any

import click
import trio

from ahvbackup.core.cli import Context, emit, pass_context

from .serve import Endpoints, serve_simulator
from .simulator import Simulator
from .users import SEED_USERS


@click.group()
def simulator() -> None:
    """The Prism simulator (Prism Central + Prism Element listeners, for demos and tests)."""


def _describe(sim: Simulator, ep: Endpoints) -> dict[str, Any]:
    seeded = {name: (password, role) for name, password, role in SEED_USERS}
    return {
        "prism_central": ep.pc_url,
        "prism_elements": [
            {"cluster": sim.clusters[uuid].name, "uuid": uuid, "url": url,
             "data_services_ip": ep.dsips[uuid], "iscsi_portal": _portal(ep, uuid)}
            for uuid, url in ep.pe_urls.items()
        ],
        "ca_cert": str(ep.ca_path) if ep.ca_path else None,
        "state_dir": str(sim.state_dir),
        "users": [
            {"name": u.name, "role": u.role,
             "password": seeded[u.name][0] if u.name in seeded else None}
            for u in sim.users
        ],
        "vms": sorted(v.name for v in sim.vms.values()),
        "api_versions": ["v3", "v4"] if sim.v4 else ["v3"],
    }


def _portal(ep: Endpoints, cluster_uuid: str) -> str | None:
    """"host:port" of the cluster's iSCSI target (volume groups), None when not served."""
    portal = ep.iscsi_portals.get(cluster_uuid)
    return f"{portal[0]}:{portal[1]}" if portal else None


def _human(d: dict[str, Any]) -> str:
    lines = [f"Prism Central   {d['prism_central']}"]
    for pe in d["prism_elements"]:
        lines.append(f"Prism Element   {pe['url']}  ({pe['cluster']}, DSIP "
                     f"{pe['data_services_ip']})")
        if pe["iscsi_portal"]:
            lines.append(f"iSCSI portal    {pe['iscsi_portal']}  ({pe['cluster']} volume groups)")
    lines.append(f"CA certificate  {d['ca_cert'] or '(plain HTTP)'}")
    lines.append(f"State           {d['state_dir']}")
    for u in d["users"]:
        pw = u["password"] or "(changed)"
        lines.append(f"User            {u['name']} / {pw}  ({u['role']})")
    lines.append(f"VMs             {', '.join(d['vms']) or '(none)'}")
    lines.append(f"APIs            {', '.join(d['api_versions'])}")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


@simulator.command()
@click.option("--state", "state", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="State directory (inventory, disks, CA); reused across restarts.")
@click.option("--http", "plain_http", is_flag=True, help="Serve plain HTTP instead of HTTPS.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of the Prism Central listener.")
@click.option("--port", default=9440, show_default=True, type=click.IntRange(0, 65535),
              help="Port of every listener (0: pick a free one).")
@click.option("--iscsi-port", default=None, type=click.IntRange(0, 65535),
              help="Port of the iSCSI targets on the DSIPs [default: 3260; a free one when "
                   "--port is 0]. Set iscsi_port= to it when it is not 3260.")
@click.option("--pe-count", default=1, show_default=True, type=click.IntRange(1, 50),
              help="Number of Prism Element clusters (first start only).")
@click.option("--seed/--no-seed", default=True, show_default=True,
              help="Create the demo VMs on first start.")
@click.option("--task-seconds", default=0.5, show_default=True, type=float,
              help="How long each task takes to finish.")
@click.option("--v4/--no-v4", "v4", default=True, show_default=True,
              help="Serve the v4 API beside v3 (--no-v4: a Prism that speaks only v3).")
@pass_context
def serve(ctx: Context, state: Path, plain_http: bool, host: str, port: int,
          iscsi_port: int | None, pe_count: int, seed: bool, task_seconds: float,
          v4: bool) -> None:
    """Serve a simulated Prism Central and Prism Element(s) until Ctrl-C."""
    sim = Simulator(state, seed=seed, pe_count=pe_count, task_seconds=task_seconds, v4=v4)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with serve_simulator(sim, host=host, port=port, tls=not plain_http,
                                       iscsi_port=iscsi_port) as ep:
                emit(ctx, _describe(sim, ep), _human)
                async for signum in signals:
                    click.echo(f"simulator stopped ({signal.Signals(signum).name})", err=True)
                    break

    try:
        trio.run(main)
    finally:
        sim.save()
        sim.close()
