"""The hook plugin: one `JobMetrics` per job, written out when the job finishes.

The CLI and the Bacula backend run one job per process, so one job is collected at a time;
a job that starts replaces the previous one's registry. Writing or pushing is best effort:
a failure is one warning naming the key, never a failed backup.
"""

from __future__ import annotations

__all__ = ["MetricsPlugin", "plugin"]

import logging
from typing import TYPE_CHECKING

from ahvbackup.core import hookimpl
from ahvbackup.core.errors import AhvBackupError
from ahvbackup.core.fsutil import io_failure

from .collect import JobMetrics
from .output import load_last_success, push, save_last_success, write_textfile

if TYPE_CHECKING:
    from ahvbackup.core.config import Config

log = logging.getLogger("ahvbackup.metrics")


class MetricsPlugin:
    def __init__(self) -> None:
        self.job: JobMetrics | None = None
        self.config: Config | None = None

    @hookimpl
    def ahvbackup_job_started(self, mode: str, config: Config) -> None:
        self.job, self.config = JobMetrics(mode=mode, tenant=config.tenant or ""), config

    @hookimpl
    def ahvbackup_metric(self, name: str, value: float, labels: dict[str, str]) -> None:
        if self.job is not None:
            self.job.observe(name, value, labels)

    @hookimpl
    def ahvbackup_job_finished(self) -> None:
        job, cfg = self.job, self.config
        if job is None or cfg is None:
            return
        if job.mode == "backup" and (cfg.metrics_textfile or cfg.metrics_pushgateway):
            self._last_success(job, cfg)
        if cfg.metrics_textfile is not None:
            try:
                write_textfile(job.registry, cfg.metrics_textfile)
            except OSError as err:
                log.warning("metrics_textfile: cannot write %s", io_failure(cfg.metrics_textfile,
                                                                            err))
        if cfg.metrics_pushgateway is not None:
            try:
                push(job.registry, cfg.metrics_pushgateway, mode=job.mode)
            except OSError as err:  # urllib's URLError and HTTPError are OSErrors
                log.warning("metrics_pushgateway: cannot push to %s: %s",
                            cfg.metrics_pushgateway, getattr(err, "reason", None) or err)

    @staticmethod
    def _last_success(job: JobMetrics, cfg: Config) -> None:
        known = load_last_success(cfg.state_dir)
        job.carry_last_success(known)
        if job.succeeded:
            try:
                save_last_success(cfg.state_dir, {**known, **job.succeeded})
            except (OSError, AhvBackupError) as err:
                log.warning("metrics: cannot keep the last-success times in state_dir: %s",
                            err)


#: the instance the ``ahvbackup.hooks`` entry point registers
plugin = MetricsPlugin()
