"""Run the benchmarks side by side and print tables; the JSON goes to bench/results/.

    python -m bench [--quick] [--only throughput,latency,propagation,assertions,connect,fleet,revocation] [--redis URL] [--out FILE]
    python -m bench --only scale [--quick] [--code-root DIR]   (10,000 rules, 100,000 devices; not in the default set)
    python -m bench --only toolkit   (who-can, lint, check and diff at 10,000 rules and 100,000 devices; not in the default set)
    python -m bench --only assertion_cli [--quick]   (1,000,000 records, whole log CLI commands; not in the default set)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    assertion_log,
    connect,
    fleet,
    fleet_scale,
    latency,
    propagation,
    revocation,
    throughput,
    toolkit,
)

ALL = ("throughput", "latency", "propagation", "assertions", "connect", "fleet", "revocation")
EXTRA = ("scale", "toolkit", "assertion_cli")  # minutes at full size: only when asked for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller fleets (a smoke run)")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL + EXTRA)}")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis for the L2 latency row ('' to skip)")
    parser.add_argument("--out", default="bench/results/latest.json", help="where to write the JSON results")
    parser.add_argument("--code-root", default=None,
                        help="scale, assertion_cli: run the commands also (assertion_cli) or only (scale) from this "
                             "checkout, e.g. a previous version")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ALL) - set(EXTRA))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("casbin").setLevel(logging.WARNING)
    results: dict[str, object] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "python": platform.python_version(), "machine": platform.machine(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="mqtt-pdp-bench-") as tmp:
        work = Path(tmp)
        if "throughput" in chosen:
            result = throughput.run(work, reps=1 if args.quick else 5, quick=args.quick)
            print("\n== End-to-end throughput (delivered messages/s; every broker up at once, flows interleaved; medians; broker CPU per delivered message)")
            print(throughput.table(result), flush=True)
            results["throughput"] = result
        if "latency" in chosen:
            result = latency.run(work / "latency", sizes=(10, 100, 1000) if args.quick else (10, 100, 1000, 10000),
                                 requests=5000 if args.quick else 20000, redis_url=args.redis or None)
            print("\n== Decision latency, 100,000 registered devices")
            print(latency.table(result), flush=True)
            results["latency"] = result
        if "propagation" in chosen:
            if args.redis:
                result = propagation.run(work, args.redis, reps=1 if args.quick else 3)
                print("\n== Policy reload across two broker processes sharing one Redis")
                print(propagation.table(result), flush=True)
                results["propagation"] = result
            else:
                print("\n== Policy reload across brokers: skipped (no --redis)")
        if "assertions" in chosen:
            result = assertion_log.run(work / "assertions", quick=args.quick)
            print("\n== Assertion log")
            print(assertion_log.table(result), flush=True)
            results["assertions"] = result
        if "connect" in chosen:
            result = connect.run(work, count=100 if args.quick else 300, reps=1 if args.quick else 3)
            print("\n== mTLS connections per second (sequential connect + CONNACK + disconnect)")
            print(connect.table(result), flush=True)
            results["connect"] = result
        if "fleet" in chosen:
            result = fleet.run(work, sizes=(100, 1000) if args.quick else (100, 1000, 10000))
            print("\n== Fleet growth: N devices each subscribed to its own command topic; one publisher")
            print(fleet.table(result), flush=True)
            results["fleet"] = result
        if "revocation" in chosen:
            size = 200 if args.quick else 1000
            result = revocation.run(work, devices=size)
            print(f"\n== Revocation: one registry write suspends {size} connected, publishing devices")
            print(revocation.table(result), flush=True)
            results["revocation"] = result
        if "assertion_cli" in chosen:
            from bench import assertion_cli

            result = assertion_cli.run(work / "assertion_cli", quick=args.quick,
                                       code_root=Path(args.code_root) if args.code_root else None)
            print("\n== Assertion log CLI at 1,000,000 records (whole commands, start-up included)")
            print(assertion_cli.table(result), flush=True)
            results["assertion_cli"] = result
        if "scale" in chosen:
            sizes = {"rules": 1000, "devices": 10_000, "policy_edits": 1, "registry_edits": 1} if args.quick else {}
            result = fleet_scale.run(work / "scale", code_root=Path(args.code_root) if args.code_root else None,
                                     **sizes)  # type: ignore[arg-type]
            print("\n== Fleet scale: check, explain, broker start, edits applied, latency during reloads")
            print(fleet_scale.table(result), flush=True)
            results["scale"] = result
        if "toolkit" in chosen:
            sizes = {"rules": 1000, "devices": 10_000} if args.quick else {}
            result = toolkit.run(work / "toolkit", **sizes)  # type: ignore[arg-type]
            print("\n== Policy author's toolkit at fleet scale: who-can, lint, check, diff")
            print(toolkit.table(result), flush=True)
            results["toolkit"] = result
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
