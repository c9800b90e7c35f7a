"""Prometheus metrics for ahvbackup, from the `metric` hook (never from our own logs).

`catalog` names every metric; `plugin` is the hook plugin (entry point ``metrics`` in the
``ahvbackup.hooks`` group) that collects one job's metrics and, at the job's end, writes them
to `metrics_textfile` and pushes them to `metrics_pushgateway`. docs/metrics.md lists them.
"""
