"""Totals over every simulated seed of a pytest session, printed at its end (see conftest)."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from .cluster import SimReport


@dataclass
class Totals:
    seeds: int = 0
    ops: int = 0
    acked_writes: int = 0
    unknown_writes: int = 0
    reads: int = 0
    virtual_seconds: float = 0.0
    cpu_seconds: float = 0.0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    transfers: collections.Counter[str] = field(default_factory=collections.Counter)
    log_writes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)

    def add(self, report: SimReport, cpu_seconds: float) -> None:
        self.seeds += 1
        self.ops += report.ops
        self.acked_writes += report.acked_writes
        self.unknown_writes += report.unknown_writes
        self.reads += report.reads
        self.virtual_seconds += report.virtual_time
        self.cpu_seconds += cpu_seconds
        self.faults.update(report.faults)
        self.messages.update(report.messages)
        self.transfers.update(report.transfers)
        self.log_writes.update(report.log_writes)
        if report.violation:
            self.violations.append(f"seed {report.seed}: {report.violation[:200]}")

    def lines(self) -> list[str]:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        messages = ", ".join(f"{k} {v}" for k, v in sorted(self.messages.items()))
        transfers = ", ".join(f"{k} {v}" for k, v in sorted(self.transfers.items()))
        return [
            f"seeds run: {self.seeds}; ops checked for linearizability: {self.ops}"
            f" ({self.acked_writes} acknowledged writes, {self.unknown_writes} of unknown"
            f" outcome, {self.reads} reads)",
            f"virtual time: {self.virtual_seconds:.0f} s in {self.cpu_seconds:.1f} s of CPU",
            f"faults injected: {sum(self.faults.values())} ({faults})",
            f"messages: {messages}",
            f"leadership transfers: {sum(self.transfers.values())} ({transfers})",
            f"durable log writes: {self.log_writes['inline']} inline (append_inline),"
            f" {self.log_writes['worker']} awaited",
            f"violations: {len(self.violations)}",
            *self.violations,
        ]


TOTALS = Totals()


def timed_run(seed: int) -> SimReport:
    from .cluster import run_seed

    start = time.process_time()
    report = run_seed(seed)
    TOTALS.add(report, time.process_time() - start)
    return report
