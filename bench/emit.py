#!/usr/bin/env python3
"""Write one bench area's results as JSON for fatbox-bench-report (bench/REPORT.md).

  bench/emit.py OUT.json --area A --title T --command CMD \
      [--row 'metric|unit|ours|anchor_name|anchor|goal|direction'] ...
      [--point 'chart|series|x_label|y_label|x|y'] ... [--note TEXT] ...

Row fields after `ours` may be empty. goal: at_most:V, at_least:V, ratio_at_most:V, ratio_at_least:V or
speedup_at_least:V. direction: `lower` (default) or `higher` (is better).
Written atomically so a crashed bench never leaves half a file for the report.
"""
import argparse
import json
import os
import sys
import tempfile

GOALS = {"at_most", "at_least", "ratio_at_most", "ratio_at_least", "speedup_at_least"}


def parse_row(spec):
    f = spec.split("|")
    f += [""] * (7 - len(f))
    if len(f) != 7 or not f[0] or not f[2]:
        sys.exit(f"emit.py: bad --row {spec!r}: need metric|unit|ours[|anchor_name|anchor|goal|direction]")
    row = {"metric": f[0], "unit": f[1], "ours": float(f[2])}
    if f[3]:
        row["anchor_name"] = f[3]
    if f[4]:
        row["anchor"] = float(f[4])
    if f[5]:
        kind, _, val = f[5].partition(":")
        if kind not in GOALS:
            sys.exit(f"emit.py: bad goal {f[5]!r}: one of {sorted(GOALS)}")
        row["goal"] = {kind: float(val)}
    if f[6]:
        if f[6] not in ("lower", "higher"):
            sys.exit(f"emit.py: bad direction {f[6]!r}")
        row["lower_is_better"] = f[6] == "lower"
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--area", required=True)
    ap.add_argument("--title", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--row", action="append", default=[])
    ap.add_argument("--point", action="append", default=[])
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args()
    series = {}
    for p in a.point:
        f = p.split("|")
        if len(f) != 6:
            sys.exit(f"emit.py: bad --point {p!r}: need chart|series|x_label|y_label|x|y")
        key = (f[0], f[1])
        s = series.setdefault(key, {"chart": f[0], "name": f[1], "x_label": f[2], "y_label": f[3], "points": []})
        s["points"].append([float(f[4]), float(f[5])])
    doc = {
        "area": a.area,
        "title": a.title,
        "command": a.command,
        "notes": a.note,
        "rows": [parse_row(r) for r in a.row],
        "series": list(series.values()),
    }
    d = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".emit.")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, a.out)


if __name__ == "__main__":
    main()
