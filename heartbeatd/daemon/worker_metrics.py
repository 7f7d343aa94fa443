"""``workers: N``: one Prometheus exposition for the whole daemon, from each worker's own.

The supervisor scrapes every worker's ``/metrics`` (text format) and re-exposes each series
with a ``worker="N"`` label: per-worker series, as Prometheus expects of several processes
behind one target (``sum without (worker) (rate(...))`` gives the daemon's total; a summed
series would drop when one worker is replaced, which ``rate()`` mistakes for a reset of the
whole sum).  The supervisor's own process metrics carry ``worker="supervisor"``.

A replaced worker starts its counters at zero.  So that ``heartbeatd_*_total{worker="1"}``
stays monotonic anyway, the merger remembers the last values it exposed for each worker's
process (by pid) and, when a new pid answers for that index, adds them to the newcomer's
counters (counters, histogram buckets, counts and sums).  What the old process counted
between the last scrape and its death is lost, as it would be for a single process; the
series never decreases.  Gauges are exposed as the new process reports them.

No Twisted here: this is the arithmetic, unit-tested without processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MetricsMerger", "WorkerAnswer", "parse"]

#: The label added to every worker's series.
LABEL = "worker"
#: Family types whose samples only grow within one process.
_MONOTONIC_TYPES = ("counter", "histogram", "summary")
#: Samples of those families that are not running totals.
_NOT_TOTALS = ("_created",)

_Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class WorkerAnswer:
    """One worker's answer to a scrape: its process id and its families."""

    pid: int
    families: list[Metric]


def parse(text: str) -> list[Metric]:
    """Families from Prometheus text format (raises ValueError on a malformed exposition)."""
    return list(text_string_to_metric_families(text))


def _key(name: str, labels: Mapping[str, str]) -> _Key:
    return name, tuple(sorted(labels.items()))


def _monotonic(family: Metric, sample_name: str) -> bool:
    return family.type in _MONOTONIC_TYPES and not sample_name.endswith(_NOT_TOTALS)


class MetricsMerger:
    """Merges per-worker families into one labelled exposition; keeps counters monotonic."""

    def __init__(self) -> None:
        #: index -> (pid, counter values last exposed for that pid, offsets included).
        self._last: dict[str, tuple[int, dict[_Key, float]]] = {}
        #: index -> what earlier processes of that index had counted (added to the current).
        self._carried: dict[str, dict[_Key, float]] = {}

    def merge(
        self,
        answers: Mapping[str, WorkerAnswer],
        extra: Iterable[Metric] = (),
        skip: Iterable[str] = (),
    ) -> list[Metric]:
        """Every answer's families, labelled ``worker=<index>``, then ``extra`` unchanged.

        ``answers`` maps a worker's label value (its index, or "supervisor") to what it
        reported; a worker missing from it did not answer, and its series are left out this
        time (its carried totals are kept for when it answers again).  Families named in
        ``skip`` are dropped (the workers' private admin sites count nothing the operator's
        requests did).
        """
        skipped = set(skip)
        merged: dict[str, Metric] = {}
        for index in sorted(answers, key=_index_order):
            answer = answers[index]
            carried = self._carry_over(index, answer.pid)
            exposed: dict[_Key, float] = {}
            for family in answer.families:
                if family.name in skipped:
                    continue
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                elif out.type != family.type:
                    continue  # a name reused with another type: the first one wins
                for sample in family.samples:
                    labels = {**sample.labels, LABEL: index}
                    value = sample.value
                    if _monotonic(family, sample.name):
                        key = _key(sample.name, sample.labels)
                        value += carried.get(key, 0.0)
                        exposed[key] = value
                    out.add_sample(sample.name, labels, value, sample.timestamp)
            self._last[index] = (answer.pid, exposed)
        result = list(merged.values())
        result.extend(extra)
        return result

    def _carry_over(self, index: str, pid: int) -> dict[_Key, float]:
        """The totals to add to ``index``'s counters, after a new process took it over."""
        carried = self._carried.setdefault(index, {})
        last = self._last.get(index)
        if last is not None and last[0] != pid:
            # A new process: what we last showed for the old one becomes the floor.
            carried.clear()
            carried.update(last[1])
        return carried


def _index_order(index: str) -> tuple[int, str]:
    return (int(index), "") if index.isdigit() else (1 << 30, index)
