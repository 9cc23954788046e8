"""The multi-host run from the command line (as root: it makes network namespaces);
the run and its checks are in sendscript/dev/scaleout.py, which `tests/hosts/` runs
in a short version.

    sudo python -m bench.scaleout                       # 5,000 tasks with faults, then 1-3 hosts
    python -m bench.scaleout --tasks 600 --no-scaling   # the fault run alone, shorter
"""

from sendscript.dev.scaleout import main

if __name__ == "__main__":
    raise SystemExit(main())
