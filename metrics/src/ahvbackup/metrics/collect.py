"""One job's metrics: a fresh registry built from the catalog, fed by `metric` events."""

from __future__ import annotations

__all__ = ["JobMetrics"]

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

from .catalog import BY_EVENT, CATALOG

# a one-job process: a counter's creation time is the job's, which says nothing
disable_created_metrics()  # type: ignore[no-untyped-call]

_Metric = Gauge | Counter


@dataclass
class JobMetrics:
    """The registry of one job (mode `mode`). `backed_up` is every (tenant, vm) a backup
    worked on, and `succeeded` the ones whose last-success time this job set."""

    mode: str
    #: the job's tenant (`tenant=`), the `tenant` label of every job, VM and disk metric
    tenant: str = ""
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    backed_up: set[tuple[str, str]] = field(default_factory=set)
    succeeded: dict[tuple[str, str], float] = field(default_factory=dict)
    _metrics: dict[str, _Metric] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for spec in CATALOG:
            kind = Gauge if spec.type == "gauge" else Counter
            self._metrics[spec.event] = kind(spec.name, spec.help, spec.labels,
                                             registry=self.registry)

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        """Record one event; names outside the catalog (other plugins' own) are not ours."""
        spec = BY_EVENT.get(name)
        if spec is None:
            return
        metric = self._metrics[name]
        labels = {**labels, "tenant": labels.get("tenant") or self.tenant}
        child = metric.labels(*(labels.get(n, "") for n in spec.labels)) if spec.labels \
            else metric
        if isinstance(child, Counter):
            child.inc(max(0.0, value))
        else:
            child.set(value)
        vm = (labels.get("tenant", ""), labels.get("vm", ""))
        if name == "vm_seconds" and labels.get("mode") == "backup":
            self.backed_up.add(vm)
        elif name == "vm_last_success_timestamp":
            self.succeeded[vm] = value

    def carry_last_success(self, known: dict[tuple[str, str], float]) -> None:
        """A VM that failed this time keeps its earlier success time, so "no success for
        26 h" can fire for it; VMs this job did not back up are left out."""
        gauge = self._metrics["vm_last_success_timestamp"]
        assert isinstance(gauge, Gauge)
        for vm in sorted(self.backed_up - set(self.succeeded)):
            if vm in known:
                gauge.labels(*vm).set(known[vm])
