"""Time and resident memory at each phase of an ExecuTorch export: where `vlmc export` spends them.

Runs `vlmc export` in this process with a thread sampling RSS every 50 ms and checkpoints around exir's
phases (edge programs, partitioning and lowering, each XNNPACK preprocess, to_executorch), the release
of memory and the verification. Each line: seconds, RSS now, the highest RSS since the previous line.
The log ends with the seconds each XNNPACK pass took over all delegates (each pass retraces its delegate's
graph, so the sum follows the delegated ops, not the number of delegates).

    python tools/trace_export_phases.py --log phases.log -- --model preset:smolvlm2-256m --target executorch -o out --force
"""
from __future__ import annotations

import argparse
import functools
import sys
import threading
import time


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


class Trace:
    def __init__(self, path: str):
        self.log, self.t0, self.peak = open(path, "w"), time.time(), 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self.peak = max(self.peak, rss_gb())
            time.sleep(0.05)

    def mark(self, what: str) -> None:
        now = rss_gb()
        self.log.write(f"[{time.time() - self.t0:7.1f}s] rss {now:.2f} GB  peak since last {max(self.peak, now):.2f} GB  {what}\n")
        self.log.flush()
        self.peak = now

    def around(self, owner, name: str, static: bool = False) -> None:
        """Mark entry and exit of `owner.name` (the CLI sends fd 2 to /dev/null, hence a log file)."""
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def marked(*args, **kwargs):
            self.mark(f"enter {name}")
            try:
                return fn(*args, **kwargs)
            finally:
                self.mark(f"exit {name}")
        setattr(owner, name, staticmethod(marked) if static else marked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default="export_phases.log")
    ap.add_argument("export_args", nargs=argparse.REMAINDER, help="after --: the arguments of vlmc export")
    args = ap.parse_args()
    trace = Trace(args.log)
    import executorch.exir.program._program as exir_program
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    import vlmc.exporter.build as build
    from vlmc.cli import main as vlmc_main

    trace.around(exir_program, "_gen_edge_manager_for_partitioners")
    trace.around(exir_program.EdgeProgramManager, "to_backend")
    trace.around(exir_program.EdgeProgramManager, "to_executorch")
    trace.around(XnnpackBackend, "preprocess", static=True)
    trace.around(build, "release_memory")
    trace.around(build, "_verify")
    pass_seconds = time_xnnpack_passes()
    sys.argv = ["vlmc", "export", *[a for a in args.export_args if a != "--"]]
    try:
        vlmc_main()
    finally:
        trace.mark("end")
        for name, (seconds, calls) in sorted(pass_seconds.items(), key=lambda kv: -kv[1][0]):
            trace.log.write(f"xnnpack pass {name}: {seconds:.1f} s over {calls} delegates\n")
        trace.log.write(f"xnnpack passes in all: {sum(s for s, _ in pass_seconds.values()):.1f} s\n")
        trace.log.flush()


def time_xnnpack_passes() -> dict:
    """{pass name: [seconds, calls]}, filled as XNNPACK's preprocess runs its passes."""
    import executorch.backends.xnnpack._passes as xnnpack_passes

    totals: dict = {}
    run_pass = xnnpack_passes._transform

    def timed(program, transform_pass):
        start = time.time()
        try:
            return run_pass(program, transform_pass)
        finally:
            entry = totals.setdefault(type(transform_pass).__name__, [0.0, 0])
            entry[0] += time.time() - start
            entry[1] += 1
    xnnpack_passes._transform = timed
    return totals


if __name__ == "__main__":
    main()
