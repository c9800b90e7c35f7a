"""`ahvbackup report`: the repository's state per VM as a self-contained HTML page (or --json)."""

from __future__ import annotations

__all__ = ["report"]

from pathlib import Path

import click

from ..errors import SinkError
from ..fsutil import io_failure
from ..jobs.runtime import Runtime
from ..report import Report, build_report, render_html
from .context import Context, emit, pass_context
from .options import config_options, load_job_config, refuse_hosted_sink, run_trio


@click.command("report")
@config_options
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the HTML page here (default: print it on stdout).")
@pass_context
def report(ctx: Context, configs: tuple[Path, ...], sets: tuple[str, ...],
           plugin_string: str | None, out: Path | None) -> None:
    """Per VM: last success, level, size, duration, chain depth and restorable points, with
    charts of bytes per day and job durations. The page loads nothing from anywhere."""
    cfg = load_job_config(configs=configs, sets=sets, plugin_string=plugin_string,
                          hooks=ctx.hooks, verbose=ctx.verbose)
    refuse_hosted_sink(cfg)
    rt = Runtime.from_config(cfg, hooks=ctx.hooks)
    result = build_report(run_trio(rt.sink.backups, None), run_trio(rt.sink.damaged, None))
    if ctx.json:
        emit(ctx, result.as_json())
        return
    page = render_html(result)
    if out is None:
        click.echo(page)
        return
    tmp = out.with_name(f".{out.name}.partial")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise SinkError(f"cannot write the report: {io_failure(out, err)}") from err
    click.echo(_summary(result, out), err=True)


def _summary(result: Report, out: Path) -> str:
    counts = {s: sum(v.status == s for v in result.vms) for s in ("ok", "stale", "broken")}
    return (f"report: {out}: {len(result.vms)} VMs ({counts['ok']} ok, {counts['stale']} stale, "
            f"{counts['broken']} broken), {len(result.damaged)} damaged entries")
