"""sdpax vs torch, side by side in one process on the same inputs: the one benchmark driver.

    python benchmarks/bench.py                        # the default suite: CPU, forward, table + plot, < 1 minute
    python benchmarks/bench.py --backward             # forward + backward
    python benchmarks/bench.py --device cuda          # the default suite on a GPU
    python benchmarks/bench.py --list                 # every suite and what it measures
    python benchmarks/bench.py --suite cpu --quick    # a suite; --quick / --full: fewer / more rows
    python benchmarks/bench.py --suite cuda --dry-run  # its rows, their work and its columns; nothing runs
    python benchmarks/bench.py --suite cuda --help    # its own options
    python benchmarks/bench.py --suite cuda --results benchmarks/RESULTS.md   # also append the table there

Every suite takes its rows from one shapes table (_common.SHAPES), counts work with one formula (4 B H L S D per
forward, visible pairs only when causal, the backward 2.5x; decode: the bytes of K and V) and times with one timer
(_common.Timer: interleaved calls, medians; CUDA events after an L2 flush). Ratios are torch time / sdpax time
(> 1: sdpax faster).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import textwrap

import _common as C
import torch
from _suites import SUITES, describe_rows

import sdpax


def _list() -> str:
    out = []
    for s in SUITES.values():
        body = textwrap.fill(s.measures, 116, initial_indent="    ", subsequent_indent="    ")
        out.append(f"  {s.name} (device: {'/'.join(s.devices)})\n{body}")
    return "suites (--suite NAME):\n" + "\n".join(out)


def _parser(suite) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + f"\nsuite {suite.name}:\n" + textwrap.fill(suite.measures, 116, initial_indent="  ",
                                                                          subsequent_indent="  "),
        epilog=_list())
    ap.add_argument("--suite", default="default", choices=list(SUITES), help="the suite to run (default: default)")
    ap.add_argument("--list", action="store_true", help="list the suites and what each measures")
    ap.add_argument("--device", default=suite.device, choices=suite.devices,
                    help=f"where to run (default for this suite: {suite.device})")
    tier = ap.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_const", dest="tier", const=C.TIERS["quick"],
                      help="the suite's shortest set of rows")
    tier.add_argument("--full", action="store_const", dest="tier", const=C.TIERS["full"],
                      help="every row of the suite")
    ap.add_argument("--only", help="only rows whose name contains this ('|' separates alternatives)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed rounds per row and pass (default: the suite's)")
    ap.add_argument("--dry-run", action="store_true", help="list the rows, their work and the columns; run nothing")
    ap.add_argument("--results", help="also append the dated table to this markdown file")
    if suite.options is not None:
        suite.options(ap.add_argument_group(f"options of the {suite.name} suite"))
    ap.set_defaults(tier=C.TIERS["default"])
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", default="default", choices=list(SUITES))
    pre.add_argument("--list", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.list:
        print(_list())
        return 0
    suite = SUITES[known.suite]
    args = _parser(suite).parse_args(argv)
    rows = C.select(suite.name, args.tier, args.device, args.only)
    if args.dry_run:
        print(f"suite {suite.name} on {args.device}: {len(rows)} rows\n{describe_rows(suite, rows, args.device)}")
        print("columns: " + " | ".join(suite.columns))
        return 0
    if not rows:
        print(f"suite {suite.name}: no rows match", file=sys.stderr)
        return 1
    if args.device == "cuda" and not (torch.cuda.is_available() and sdpax.build_config.WITH_CUDA):
        print(f"suite {suite.name}: needs a CUDA device and a CUDA build of sdpax "
              f"(CUDA available: {torch.cuda.is_available()}, sdpax built with CUDA: {sdpax.build_config.WITH_CUDA})",
              file=sys.stderr)
        return 1
    table, extra = suite.run(args, rows)
    command = shlex.join(["python", "benchmarks/bench.py", *argv])
    what = f"{suite.name} suite, {args.device}" + (", forward + backward" if getattr(args, "backward", False) else "")
    head = C.header(what, args.device, command)
    text = "\n".join([head, table, *extra])
    print()
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
