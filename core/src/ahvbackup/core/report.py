"""`ahvbackup report`: what the repository holds, per VM, as one self-contained HTML page or JSON.

Pure functions: `build_report` reads the sink's inventory into a typed `Report`, `render_html`
draws it (inline CSS and SVG, and a Content-Security-Policy that forbids every fetch, so the
page works from a mail attachment or an air-gapped jump host and cannot leak by loading
anything). Nothing here talks to the cluster.
"""

from __future__ import annotations

__all__ = ["Report", "VmReport", "build_report", "render_html"]

import html
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .drivers import DamagedBackup, StoredBackup
from .errors import SinkError, StreamFormatError
from .jobs.chain import resolve_chain

#: a VM whose last success is older than this is "stale" (a nightly job missed one night)
STALE_AFTER = 26 * 3600
DAY = 86400


@dataclass(frozen=True)
class Point:
    """One backup point of a VM, and whether every disk of it can be rebuilt."""

    backup_id: str
    level: str
    created: float
    duration: float  # seconds from snapshot to commit (0 when the manifest does not say)
    bytes_stored: int
    chain_depth: int  # links needed for its deepest disk (1: a full)
    restorable: bool
    problem: str = ""  # why it is not restorable


@dataclass(frozen=True)
class VmReport:
    """One VM: its points, oldest first, and its status (`ok`, `stale`, `broken`)."""

    vm_name: str
    vm_uuid: str
    points: tuple[Point, ...]
    status: str
    why: str

    @property
    def last(self) -> Point | None:
        good = [p for p in self.points if p.restorable]
        return good[-1] if good else None


@dataclass(frozen=True)
class Report:
    generated: float
    vms: tuple[VmReport, ...]
    damaged: tuple[DamagedBackup, ...]
    #: (UTC day start, bytes stored that day), oldest first, days without backups included
    bytes_per_day: tuple[tuple[float, int], ...]

    def as_json(self) -> dict[str, object]:
        return {
            "generated": self.generated,
            "vms": [{**asdict(v), "last_success": v.last.created if v.last else None}
                    for v in self.vms],
            "damaged": [asdict(d) for d in self.damaged],
            "bytes_per_day": [{"day": d, "bytes": b} for d, b in self.bytes_per_day],
        }


def _point(backup: StoredBackup, by_id: dict[str, StoredBackup]) -> Point:
    m = backup.manifest
    depth, problem = 1, ""
    try:
        for entry in m.streams:
            depth = max(depth, len(resolve_chain(by_id, backup, entry)))
    except (SinkError, StreamFormatError) as err:
        problem = str(err)
    duration = max(0.0, m.completed - m.created) if m.completed else 0.0
    return Point(backup_id=backup.backup_id, level=backup.level, created=backup.created,
                 duration=duration, bytes_stored=backup.bytes_stored, chain_depth=depth,
                 restorable=not problem, problem=problem)


def _status(points: Sequence[Point], now: float) -> tuple[str, str]:
    good = [p for p in points if p.restorable]
    if not good:
        return "broken", "no restorable point"
    age = now - good[-1].created
    if age > STALE_AFTER:
        return "stale", f"last restorable point is {age / 3600:.0f} h old"
    if not points[-1].restorable:
        return "broken", f"newest point {points[-1].backup_id} cannot be restored"
    return "ok", ""


def build_report(backups: Sequence[StoredBackup], damaged: Sequence[DamagedBackup], *,
                 now: float | None = None) -> Report:
    """The report of a repository's `backups` (complete ones, any order) and `damaged` entries."""
    now = time.time() if now is None else now
    by_id = {b.backup_id: b for b in backups}
    per_vm: dict[str, list[StoredBackup]] = defaultdict(list)
    for b in backups:
        per_vm[b.vm_uuid].append(b)
    vms = []
    for mine in per_vm.values():
        mine.sort(key=lambda b: b.created)
        points = tuple(_point(b, by_id) for b in mine)
        status, why = _status(points, now)
        vms.append(VmReport(vm_name=mine[-1].vm_name, vm_uuid=mine[-1].vm_uuid, points=points,
                            status=status, why=why))
    vms.sort(key=lambda v: v.vm_name)
    days: dict[float, int] = defaultdict(int)
    for b in backups:
        days[b.created // DAY * DAY] += b.bytes_stored
    series: list[tuple[float, int]] = []
    if days:
        day = min(days)
        while day <= max(days):
            series.append((day, days.get(day, 0)))
            day += DAY
    return Report(generated=now, vms=tuple(vms), damaged=tuple(damaged),
                  bytes_per_day=tuple(series))


# -- HTML --------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{background:#2e7d32}.stale{background:#f9a825}.broken{background:#c62828}
.dot{display:inline-block;width:12px;height:12px;border-radius:6px;vertical-align:middle}
svg{background:#fafafa;border:1px solid #eee}
svg text{font-size:11px;fill:#555}
"""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + " UTC"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"


def _bars(title: str, values: Sequence[tuple[str, float]], fmt: Callable[[float], str],
          css: str) -> str:
    """A bar chart as inline SVG: one bar per (label, value)."""
    w, h, pad = max(240, 28 * len(values) + 60), 160, 40
    top = max((v for _, v in values), default=0) or 1
    bw = (w - pad - 10) / max(1, len(values))
    out = [f'<svg class="{css}" width="{w}" height="{h}" role="img" '
           f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>',
           f'<text x="{pad}" y="14">{html.escape(title)} (max {html.escape(fmt(top))})</text>']
    for i, (label, v) in enumerate(values):
        bh = (h - 50) * v / top
        x = pad + i * bw
        out.append(f'<rect class="bar" x="{x + 2:.1f}" y="{h - 30 - bh:.1f}" '
                   f'width="{max(1.0, bw - 4):.1f}" height="{bh:.1f}" fill="#1565c0">'
                   f'<title>{html.escape(label)}: {html.escape(fmt(v))}</title></rect>')
        if len(values) <= 14 or i % (len(values) // 7 + 1) == 0:
            out.append(f'<text x="{x + 2:.1f}" y="{h - 14}">{html.escape(label[-5:])}</text>')
    out.append("</svg>")
    return "".join(out)


def render_html(report: Report) -> str:
    """The report as one HTML page that loads nothing."""
    rows = []
    for v in report.vms:
        last = v.last
        rows.append(
            f'<tr class="vm"><td><span class="dot {v.status}" title="{v.status}"></span> '
            f'{html.escape(v.status)}</td><td>{html.escape(v.vm_name)}</td>'
            f'<td>{_when(last.created) if last else "never"}</td>'
            f'<td>{html.escape(last.level) if last else ""}</td>'
            f'<td class="n">{_size(last.bytes_stored) if last else ""}</td>'
            f'<td class="n">{f"{last.duration:.1f} s" if last else ""}</td>'
            f'<td class="n">{last.chain_depth if last else ""}</td>'
            f'<td class="n">{sum(p.restorable for p in v.points)} / {len(v.points)}</td>'
            f'<td>{html.escape(v.why)}</td></tr>')
    charts = [_bars("bytes stored per day",
                    [(time.strftime("%Y-%m-%d", time.gmtime(d)), b)
                     for d, b in report.bytes_per_day], lambda n: _size(int(n)), "per-day")]
    for v in report.vms:
        charts.append(f"<h3>{html.escape(v.vm_name)}</h3>" + _bars(
            f"job duration of {v.vm_name}",
            [(time.strftime("%m-%d %H:%M", time.gmtime(p.created)), p.duration)
             for p in v.points], lambda s: f"{s:.1f} s", "durations"))
        broken = [p for p in v.points if not p.restorable]
        if broken:
            charts.append("<ul>" + "".join(
                f"<li>{html.escape(p.backup_id)}: {html.escape(p.problem)}</li>"
                for p in broken) + "</ul>")
    damaged = "".join(
        f"<tr><td>{html.escape(d.vm)}</td><td>{html.escape(d.backup_id)}</td>"
        f"<td>{html.escape(d.where)}</td><td>{html.escape(d.reason)}</td></tr>"
        for d in report.damaged)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">"
        f"<title>ahvbackup report {_when(report.generated)}</title><style>{_CSS}</style>"
        f"</head><body><h1>ahvbackup report</h1><p>Generated {_when(report.generated)}; "
        f"{len(report.vms)} VMs, {sum(len(v.points) for v in report.vms)} backup points, "
        f"{len(report.damaged)} damaged entries.</p>"
        "<h2>Virtual machines</h2><table id=\"vms\"><tr><th>status</th><th>VM</th>"
        "<th>last success</th><th>level</th><th>size</th><th>duration</th>"
        "<th>chain depth</th><th>restorable points</th><th>note</th></tr>"
        + "".join(rows) + "</table>"
        + (f"<h2>Damaged entries</h2><table id=\"damaged\"><tr><th>VM</th><th>backup</th>"
           f"<th>where</th><th>reason</th></tr>{damaged}</table>" if damaged else "")
        + "<h2>History</h2>" + "".join(charts) + "</body></html>")
