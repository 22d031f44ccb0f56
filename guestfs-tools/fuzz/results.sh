#!/bin/sh
# One markdown row per long-run.sh log: libFuzzer's final stats (an interrupted run prints
# them too), the coverage at start and at the end, and whether it crashed.
logs="${1:-/var/cache/fatbox-fuzz-corpus/logs}"
echo "| target | started (UTC) | executions | seconds | exec/s | new units | cov start -> end (edges, features) | crash |"
echo "|---|---|---:|---:|---:|---:|---|---|"
for f in "$logs"/*.log; do
    b=$(basename "$f" .log)
    t=${b%-*}
    st=${b##*-}
    ex=$(awk '/stat::number_of_executed_units/ {print $2}' "$f")
    rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$f")
    new=$(awk '/stat::new_units_added/ {print $2}' "$f")
    secs=$(awk '/^Done / {print $5}' "$f")
    first=$(grep -m1 INITED "$f" | grep -o "cov: [0-9]*" | cut -d' ' -f2)
    last=$(grep "cov: " "$f" | tail -n1 | sed -n 's/.*cov: \([0-9]*\) ft: \([0-9]*\).*/\1, \2/p')
    crash=no
    grep -q -e "==ERROR" -e "ERROR: libFuzzer" -e "panicked" "$f" && crash=YES
    echo "| $t | $st | ${ex:-running} | ${secs:-interrupted} | ${rate:-} | ${new:-} | $first -> $last | $crash |"
done
