"""The chaos run from the command line; the run and its checks are in
sendscript/dev/chaos.py, which `tests/chaos/` runs in a short version.

    python -m bench.chaos --duration 600 --kill-every 6 --restart-every 60
"""

from sendscript.dev.chaos import main

if __name__ == "__main__":
    raise SystemExit(main())
