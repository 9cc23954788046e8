"""The protections, measured: backpressure, cluster-wide rate limits, the breaker.

    python -m bench.protections [--quick]

Runs, one after the other, each on fresh embedded servers:

- `bench.backpressure`: the master's RSS with 1,000,000 items waiting in the ready
  list (it takes only up to its high-water mark);
- `bench.limits`: sends per second of 2 masters against a 20/s global limit over
  60 s (each second's count, and the total against 1,200);
- `bench.breaker`: time from a central-control outage's start to the breaker
  opening, and from the recovery to full speed (503s, then timeouts).

`--quick` runs each for a fraction of the time (a smoke run, not the figures).
Each part can also be run alone with its own options.

Each part accounts for what it submitted from the stores (sendscript/dev/tally.py): the
limits and breaker parts read every task back terminal from Mongo, the
backpressure part finds every pushed item stored in Mongo or still listed in
Redis. Their tally lines are printed again at the end; exits 1 when any part is
not ok, a task lost or unfinished among the reasons.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from bench import backpressure, breaker, limits


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    opts = p.parse_args(argv)
    out = Console()
    ok = True

    out.rule("backpressure: master RSS with a long ready list")
    bp = backpressure.parse_args(["--items", "100000", "--duration", "20"] if opts.quick else [])
    result_bp = backpressure.run(bp)
    backpressure.render(result_bp, out)
    ok &= result_bp.ok
    read_back = [("backpressure", result_bp.read_back)]

    out.rule("rate limits: 2 masters against one global limit")
    lim = limits.parse_args(["--duration", "15"] if opts.quick else [])
    result_lim = limits.run(lim)
    limits.render(result_lim, out)
    ok &= result_lim.ok
    read_back.append(("rate limits", result_lim.read_back))

    out.rule("circuit breaker: outage to open, recovery to full speed")
    for mode in ("503", "timeout"):
        br = breaker.parse_args(["--mode", mode])
        result_br = breaker.run(br)
        breaker.render(result_br, out)
        ok &= result_br.ok
        read_back.append((f"breaker, {mode}", result_br.read_back))

    out.rule("read back from the stores")
    for part, line in read_back:
        out.print(f"{part}: {line}", markup=False, highlight=False, soft_wrap=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
