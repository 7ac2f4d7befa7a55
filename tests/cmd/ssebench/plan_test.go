package main

import (
	"slices"
	"strconv"
	"testing"
	"time"
)

func TestInterleavedRepetitions(t *testing.T) {
	cfg, err := parseFlags([]string{"-reps", "3", "-clients", "100,200", "-workloads", "steady"})
	if err != nil {
		t.Fatal(err)
	}
	runs := cfg.plan()
	cells := map[Cell][]int{} // run indexes
	for i, r := range runs {
		cells[r.Cell] = append(cells[r.Cell], i)
		if want := len(cells[r.Cell]); r.Rep != want {
			t.Errorf("run %d: %s is rep %d, want %d", i, r.Cell, r.Rep, want)
		}
	}
	if len(cells) != 2*len(allPeers) {
		t.Fatalf("%d cells, want %d", len(cells), 2*len(allPeers))
	}
	// every cell runs once per round: between two repetitions of a cell,
	// every other cell runs exactly once
	round := len(cells)
	for c, idx := range cells {
		if len(idx) != 3 {
			t.Errorf("%s: %d runs, want 3", c, len(idx))
		}
		for k := 1; k < len(idx); k++ {
			if idx[k]-idx[k-1] != round {
				t.Errorf("%s: runs %v are not one round (%d runs) apart", c, idx, round)
			}
		}
	}
}

func TestPlanOfEveryWorkload(t *testing.T) {
	cfg, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.maxFiles = 20000
	runs := cfg.plan()
	seen := map[string]bool{}
	for _, r := range runs {
		seen[r.Workload] = true
		if r.Workload == workTLS && r.Peer != peerFanout && r.Peer != peerReverseProxy {
			t.Errorf("TLS run of %s: only Caddy's peers speak TLS here", r.Peer)
		}
		if r.Workload == workTLS && r.Proto == protoH1 || r.Workload != workTLS && r.Proto != protoH1 {
			t.Errorf("%s: protocol %s", r.Cell, r.Proto)
		}
		if (r.Burst > 0) != (r.Workload == workBurst) {
			t.Errorf("%s: burst %d", r.Cell, r.Burst)
		}
		why := cannot(r.Cell, cfg.maxFiles)
		if fits := fdsPerClient(r.Peer)*r.Clients+fdSlack <= cfg.maxFiles; fits == (why != "") {
			t.Errorf("%s: cannot = %q with %d open files", r.Cell, why, cfg.maxFiles)
		}
	}
	for _, w := range allWorkloads {
		if !seen[w] {
			t.Errorf("no run of workload %s", w)
		}
	}
	if d := cfg.estimate(runs); d < time.Duration(len(runs))*runSetup/2 || d > 45*time.Minute {
		t.Errorf("a default invocation is estimated at %s: keep it under 45 minutes", d)
	}
}

func TestQuickKeepsExplicitFlags(t *testing.T) {
	def, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	quick, err := parseFlags([]string{"-quick"})
	if err != nil {
		t.Fatal(err)
	}
	if len(quick.plan()) >= len(def.plan()) || quick.window >= def.window {
		t.Errorf("quick mode is not shorter: %d runs of %s, default %d of %s", len(quick.plan()), quick.window, len(def.plan()), def.window)
	}
	mixed, err := parseFlags([]string{"-quick", "-reps", "4", "-clients", "300"})
	if err != nil {
		t.Fatal(err)
	}
	if mixed.reps != 4 || !slices.Equal(mixed.clients, []int{300}) || mixed.window != quick.window {
		t.Errorf("-quick with -reps 4 -clients 300: reps %d, clients %v, window %s", mixed.reps, mixed.clients, mixed.window)
	}
}

func TestFlagsAreChecked(t *testing.T) {
	for _, args := range [][]string{
		{"-peers", "sse_fanout,haproxy"},
		{"-workloads", "soak"},
		{"-clients", "1000,20000"},
		{"-reps", "0"},
		{"-window", "10ms"},
		{"-burst-rates", "0"},
		{"stray"},
	} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("parseFlags(%q): no error", args)
		}
	}
}

// The load tool checks every client's sequence in every run, and in bursts
// takes latencies from a sample of the clients only.
func TestLoadArgsOfEachWorkload(t *testing.T) {
	cfg, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.maxFiles = 20000
	b := &bench{cfg: cfg}
	seen := map[string]bool{}
	for _, r := range cfg.plan() {
		if seen[r.Workload] {
			continue
		}
		seen[r.Workload] = true
		args, _ := b.loadArgs(&RunResult{Cell: r.Cell, Rep: r.Rep}, "http://127.0.0.1:1/events")
		flag := func(name string) string {
			if i := slices.Index(args, name); i >= 0 && i+1 < len(args) {
				return args[i+1]
			}
			return ""
		}
		if flag("-gap-from") != "seq" {
			t.Errorf("%s: %q", r.Workload, args)
		}
		burst := r.Workload == workBurst
		want := ""
		if burst {
			want = strconv.Itoa(burstLatencyEvery)
		}
		if got := flag("-latency-every"); got != want {
			t.Errorf("%s: -latency-every %q, want %q", r.Workload, got, want)
		}
		if got := flag("-expect-seq"); (got == strconv.Itoa(r.Burst)) != burst {
			t.Errorf("%s: -expect-seq %q, burst %d", r.Workload, got, r.Burst)
		}
	}
	if len(seen) != 4 {
		t.Errorf("workloads seen: %v", seen)
	}
}
