"""The stepscope command line.

    python -m stepscope report run.json [--png out.png] [--trace out.json.gz] [--html out.html]
    python -m stepscope compare before.json after.json [--html out.html]
    python -m stepscope merge rank0.json.gz rank1.json.gz -o all.json.gz
    python -m stepscope tune-report loader.json

``report`` prints the summary table and the diagnosis of a run saved with ``Monitor.save``, and
optionally writes its PNG dashboard, its Perfetto trace and its HTML report. ``compare`` prints
two runs' p50s per phase, whether each difference is beyond noise and a verdict
(:func:`stepscope.compare`), exit status 0 whatever it finds. ``tune-report`` prints a result saved
by a tuner (``stepscope.tune``, ``TuneResult.save``). ``merge`` puts the traces of several
ranks (each from its own ``Monitor.export_trace``) in one file, one process per rank on one time
axis. A missing, foreign, damaged, oversized (``--max-bytes``, default 512 MiB once
decompressed) or newer file, a FIFO or device given as a file, and a target that cannot be
written are each one line on stderr naming the file, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
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
    rp.add_argument("--html", metavar="OUT.html", help="also write the self-contained HTML report")
    _max_bytes(rp, "the run file")
    cp = sub.add_parser("compare", help="compare two saved runs, with a verdict beyond noise",
                        description="Per phase and for the step: both p50s, the change, and whether it is "
                        "beyond noise (a rank test on the saved steps); samples/s, MFU, findings; a verdict.")
    cp.add_argument("runs", nargs=2, metavar="RUN", help="two run files written by Monitor.save(): before, after")
    cp.add_argument("--html", metavar="OUT.html", help="also write the comparison as a self-contained HTML page")
    _max_bytes(cp, "each run file")
    tp = sub.add_parser("tune-report", help="print a tuner's saved result",
                        description="Print the table and the recommendation of a result written by "
                        "stepscope.tune's TuneResult.save().")
    tp.add_argument("result", help="a result file written by TuneResult.save()")
    tp.add_argument("--png", metavar="OUT.png", help="also write the bar chart of the speedups (needs matplotlib)")
    _max_bytes(tp, "the file")
    mp = sub.add_parser("merge", help="merge the traces of several ranks into one",
                        description="Merge traces written by Monitor.export_trace on several ranks into one "
                        "Perfetto/Chrome trace: one process per rank, shifted onto one time axis by each "
                        "Monitor's start time.")
    mp.add_argument("traces", nargs="+", help="trace files (.json or .json.gz) written by export_trace")
    mp.add_argument("-o", "--output", required=True, metavar="OUT.json[.gz]", help="the merged trace")
    _max_bytes(mp, "each trace")
    return ap


def _max_bytes(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--max-bytes", type=_positive_int, default=None, metavar="N",
                   help=f"read at most N bytes of {what} once decompressed (default 512 MiB)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of bytes >= 1, got {n}")
    return n


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg if msg.startswith("stepscope:") else f"stepscope: {msg}"


def _say(text: str) -> None:
    # A reader that stops early (``| head``) closes stdout: the files asked for are written all the
    # same, the rest of the text goes nowhere.
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # Reading and writing need stepscope.run and stepscope.export alone: neither imports torch or
    # the extension (a run file carries its phase table), so this works where torch is not installed.
    from . import export, run

    # Reading: the file's own problems (missing, foreign, damaged, too large) are named by load().
    try:
        if args.command == "merge":
            merged = export.merge_traces(args.traces, args.output, max_bytes=args.max_bytes)
            print(f"wrote {args.output}: {len(args.traces)} trace(s), {len(merged['traceEvents'])} events")
            return 0
        if args.command == "tune-report":
            from ._tune_result import load_result

            res = load_result(args.result, max_bytes=args.max_bytes)
            _say(res.summary())
            if args.png:
                res.plot(args.png)
                _say(f"wrote {args.png}")
            return 0
        if args.command == "compare":
            a, b = (run.load(p, max_bytes=args.max_bytes) for p in args.runs)
        else:
            saved = run.load(args.run, max_bytes=args.max_bytes)
    except (OSError, ValueError, ImportError) as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
        # The right format and schema, but fields missing or of the wrong type: edited or truncated.
        print(f"stepscope: a trace given to merge is damaged ({type(e).__name__}: {' '.join(str(e).split())})",
              file=sys.stderr)
        return 2
    # Using it: a file that passed load()'s checks and still fails here is damaged in a way they
    # do not see; writes that fail name their target (export's atomic writes do).
    if args.command == "compare":
        return _compare(a, b, args)
    try:
        _say(saved.summary())  # ends with the diagnosis ("What to fix first")
        if args.png:
            with warnings.catch_warnings():
                # matplotlib's warnings about odd values (a damaged or edited file) would print
                # several lines on stderr; the dashboard is written all the same.
                warnings.simplefilter("ignore")
                export.plot(saved, args.png)
            _say(f"wrote {args.png}")
        if args.trace:
            export.write_trace(saved, args.trace)
            _say(f"wrote {args.trace}")
        if args.html:
            export.write_html(saved, args.html)
            _say(f"wrote {args.html}")
    except (OSError, ImportError) as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, IndexError, ZeroDivisionError) as e:
        print(f"stepscope: {args.run} is damaged ({type(e).__name__}: {' '.join(str(e).split())})",
              file=sys.stderr)
        return 2
    return 0


def _compare(a: "object", b: "object", args: argparse.Namespace) -> int:
    from .compare import compare

    try:
        cmp = compare(a, b)
        _say(str(cmp))
        if args.html:
            cmp.to_html(args.html)
            _say(f"wrote {args.html}")
    except OSError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError) as e:
        print(f"stepscope: {' or '.join(args.runs)} is damaged ({type(e).__name__}: {' '.join(str(e).split())})",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
