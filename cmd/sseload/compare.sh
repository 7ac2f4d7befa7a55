#!/usr/bin/env bash
# compare.sh measures sse_fanout against Caddy's stock reverse_proxy in front
# of the same origin, on loopback, in one go:
#
#	cmd/sseload/compare.sh                       # from the repository root
#	CLIENTS="1000 5000" DURATION=20 REPEAT=1 OUT=/tmp/bench cmd/sseload/compare.sh
#
# It builds cmd/caddy, cmd/sseload and cmd/sseload/origin into $OUT, starts
# the origin (RATE events/s of SIZE bytes), and for each client count runs
# sseload for DURATION seconds against sse_fanout (:8080) and then
# reverse_proxy (:8081) of cmd/sseload/Caddyfile.bench. Each measurement
# gets a fresh Caddy process, so that one run's memory does not show in the
# next one's RSS. Per run it records the origin's open event streams, Caddy's
# RSS (VmRSS) before the run and 1s before its end, while every client is
# still connected, Caddy's and the origin's CPU time
# (utime+stime) from the start of the run to that sample, and what sseload
# reports. Then it prints the ratios reverse_proxy / sse_fanout.
#
# Every process runs with ulimit -n 20000: with reverse_proxy Caddy holds
# two descriptors per client, so 5000 clients is the most that fits.
# Dependencies: go, awk, jq. Only processes this script starts are stopped.
set -euo pipefail

OUT=${OUT:-/tmp/bench}
CLIENTS=${CLIENTS:-"1000 5000"}
DURATION=${DURATION:-20} # seconds, at least 5
SOURCES=${SOURCES:-4}
RATE=${RATE:-10}
SIZE=${SIZE:-200}
REPEAT=${REPEAT:-1}
PATH_=${PATH_:-/events/ticker}

cd "$(dirname "$0")/../.."
ulimit -n 20000
mkdir -p "$OUT"
go build -o "$OUT/caddy" ./cmd/caddy
go build -o "$OUT/sseload" ./cmd/sseload
go build -o "$OUT/origin" ./cmd/sseload/origin
cp cmd/sseload/Caddyfile.bench "$OUT/Caddyfile"

# the processes this script started and has not stopped yet
OPID= CPID= LPID=
cleanup() {
	for p in $LPID $CPID $OPID; do
		kill "$p" 2>/dev/null || true
	done
}
trap cleanup EXIT

TCK=$(getconf CLK_TCK)
# utime+stime in clock ticks (the process names here have no spaces)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
origin_streams() { tail -n 1 "$OUT/origin.log" | sed -n 's/.* streams=\([0-9]*\) .*/\1/p'; }
origin_idle() { [ "$(origin_streams)" = 0 ]; }
listening() { ss -Hltn "sport = :$1" | grep -q .; }

wait_until() { # wait_until <tries of 0.1s> <command...>
	local tries=$1
	shift
	for ((i = 0; i < tries; i++)); do
		if "$@"; then return 0; fi
		sleep 0.1
	done
	echo "compare.sh: timed out waiting for: $*" >&2
	return 1
}

stop() { # stop <pid>: TERM, then KILL after 10s
	local pid=$1
	kill "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

for port in 8080 8081 9000; do
	if listening $port; then
		echo "compare.sh: port $port is in use" >&2
		exit 1
	fi
done

"$OUT/origin" -listen 127.0.0.1:9000 -rate "$RATE" -size "$SIZE" -duration 2h >"$OUT/origin.log" 2>&1 &
OPID=$!
wait_until 100 listening 9000

echo "# $(date -u +%FT%TZ) $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# origin $RATE events/s of $SIZE bytes, ${DURATION}s runs, $SOURCES source addresses"
printf '%-13s %7s %9s %6s %9s %8s %8s %8s %5s %8s %9s %9s %9s %9s\n' \
	handler clients connected errors events/s p50_ms p99_ms max_ms gaps origin_c caddy_cpu caddy_rss origin_cpu caddy_rss0
RESULTS="$OUT/results.txt"
: >"$RESULTS"

for ((rep = 1; rep <= REPEAT; rep++)); do
	for n in $CLIENTS; do
		for target in sse_fanout:8080 reverse_proxy:8081; do
			name=${target%%:*}
			port=${target##*:}
			"$OUT/caddy" run --config "$OUT/Caddyfile" --adapter caddyfile >"$OUT/caddy-$name-$n-$rep.log" 2>&1 &
			CPID=$!
			wait_until 100 listening 8080
			wait_until 100 listening 8081
			wait_until 300 origin_idle
			sleep 1

			crss0=$(rss_kb "$CPID")
			c0=$(cpu_ticks "$CPID")
			o0=$(cpu_ticks "$OPID")
			json="$OUT/sseload-$name-$n-$rep.json"
			"$OUT/sseload" -url "http://127.0.0.1:$port$PATH_" -clients "$n" -duration "${DURATION}s" -sources "$SOURCES" -json >"$json" 2>"$OUT/sseload-$name-$n-$rep.err" &
			LPID=$!
			sleep $((DURATION - 1))
			c1=$(cpu_ticks "$CPID")
			o1=$(cpu_ticks "$OPID")
			crss=$(rss_kb "$CPID")
			ostreams=$(origin_streams)
			wait "$LPID"
			LPID=
			stop "$CPID"
			CPID=

			row=$(jq -r --arg name "$name" --arg n "$n" --arg oc "$ostreams" \
				--arg ccpu "$(awk -v a="$c0" -v b="$c1" -v t="$TCK" 'BEGIN {printf "%.2f", (b - a) / t}')" \
				--arg crss "$(awk -v k="$crss" 'BEGIN {printf "%.1f", k / 1024}')" \
				--arg ocpu "$(awk -v a="$o0" -v b="$o1" -v t="$TCK" 'BEGIN {printf "%.2f", (b - a) / t}')" \
				--arg crss0 "$(awk -v k="$crss0" 'BEGIN {printf "%.1f", k / 1024}')" \
				'[$name, $n, .connected, .connect_errors, (.events_per_second | floor), (.latency_p50_ms * 100 | round / 100), (.latency_p99_ms * 100 | round / 100), (.latency_max_ms * 100 | round / 100), .gap_clients, $oc, $ccpu, $crss, $ocpu, $crss0] | @tsv' "$json")
			echo "$row" >>"$RESULTS"
			# shellcheck disable=SC2086
			printf '%-13s %7s %9s %6s %9s %8s %8s %8s %5s %8s %9s %9s %9s %9s\n' $row
		done
	done
done

echo "# caddy_cpu, origin_cpu: CPU seconds over the run; caddy_rss: MiB at the end; caddy_rss0: Caddy's MiB before the run; origin_c: origin event streams open"
echo "# ratios reverse_proxy / sse_fanout (medians over the repeats):"
printf '%-7s %9s %9s %9s %10s %9s %9s %9s\n' clients origin_c caddy_cpu caddy_rss rss-rss0 p50 p99 origin_cpu
for n in $CLIENTS; do
	awk -F'\t' -v n="$n" '
		function median(a, k,   i, j, t) { # sorts a[1..k] in place
			for (i = 2; i <= k; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
			return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
		}
		function ratio(col, base,   f, p, kf, kp) { # of the medians of column col (minus column base)
			kf = kp = 0
			for (i = 1; i <= rows; i++) {
				x = v[i, col] - (base ? v[i, base] : 0)
				if (name[i] == "sse_fanout") f[++kf] = x; else p[++kp] = x
			}
			if (kf == 0 || kp == 0) return "n/a"
			f0 = median(f, kf); p0 = median(p, kp)
			return f0 > 0 ? sprintf("%.1f", p0 / f0) : "inf"
		}
		$2 == n { rows++; name[rows] = $1; for (c = 1; c <= NF; c++) v[rows, c] = $c }
		END { printf "%-7s %9s %9s %9s %10s %9s %9s %9s\n", n, ratio(10), ratio(11), ratio(12), ratio(12, 14), ratio(6), ratio(7), ratio(13) }
	' "$RESULTS"
done
