"""The stepscope command line: ``python -m stepscope report run.json [--png out.png] [--trace out.json.gz]``.

Prints the summary table and the diagnosis of a run saved with ``Monitor.save``; optionally
writes its PNG dashboard and its Perfetto trace. A missing, foreign or newer file is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stepscope",
                                 description="Read runs saved with Monitor.save().")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rp = sub.add_parser("report", help="print a saved run's summary and diagnosis",
                        description="Print the summary table and the diagnosis of a run saved with "
                        "Monitor.save(); optionally write its dashboard and its trace.")
    rp.add_argument("run", help="a run file written by Monitor.save() (JSON, or .json.gz)")
    rp.add_argument("--png", metavar="OUT.png", help="also write the 1200x800 dashboard (needs matplotlib)")
    rp.add_argument("--trace", metavar="OUT.json[.gz]",
                    help="also write the Chrome/Perfetto trace of the saved steps (gzip when it ends in .gz)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # Only the export module (no torch import) is needed to read a run; the package import is
    # what `python -m stepscope` costs anyway.
    from . import export

    try:
        run = export.load(args.run)
        print(run.summary())  # ends with the diagnosis ("What to fix first")
        if args.png:
            export.plot(run, args.png)
            print(f"wrote {args.png}")
        if args.trace:
            export.write_trace(run, args.trace)
            print(f"wrote {args.trace}")
    except (OSError, ValueError, ImportError) as e:
        msg = str(e) if str(e).startswith("stepscope:") else f"stepscope: {e}"
        print(msg, file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as e:
        # The right format and schema, but fields missing or of the wrong type: edited or truncated.
        print(f"stepscope: {args.run} is a damaged stepscope run ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
