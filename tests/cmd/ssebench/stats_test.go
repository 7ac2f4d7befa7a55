package main

import (
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestMedianSplitsTheValues(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for n := 1; n < 40; n++ {
		xs := make([]float64, n)
		for i := range xs {
			xs[i] = math.Round(rng.Float64() * 20) // repeated values too
		}
		orig := slices.Clone(xs)
		m := median(xs)
		if !slices.Equal(xs, orig) {
			t.Fatal("median changed its input")
		}
		below, above := 0, 0
		for _, x := range xs {
			if x < m {
				below++
			}
			if x > m {
				above++
			}
		}
		if below > n/2 || above > n/2 {
			t.Errorf("median of %v = %v: %d values below, %d above", xs, m, below, above)
		}
		if n%2 == 1 && !slices.Contains(xs, m) {
			t.Errorf("median of an odd count %v = %v, not one of them", xs, m)
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is not NaN")
	}
}

// measuredRun is a run with figures, as runOne leaves it before judge.
func measuredRun(c Cell, rep int, cpu, genCore float64, connected int64) *RunResult {
	return &RunResult{
		Cell: c, Rep: rep, CPUPerDeliveryUs: cpu, GenCorePercent: genCore,
		RSSPerClientKiB: cpu * 3,
		Load:            &loadReport{Connected: connected, LatencyP99ms: cpu * 2, EventsPerSecond: 100},
	}
}

func TestJudge(t *testing.T) {
	lim := limits{gen: 80, other: 20}
	c := Cell{Workload: workSteady, Peer: peerFanout, Clients: 100, Rate: 10, Proto: protoH1}
	for _, gen := range []float64{0, lim.gen - 0.1, lim.gen, lim.gen + 0.1, 100} {
		r := measuredRun(c, 1, 5, gen, 100)
		judge(r, lim)
		if bound := r.Status == statusGeneratorBound; bound != (gen > lim.gen) {
			t.Errorf("generator core %v%%: status %s", gen, r.Status)
		}
		if r.Status == statusGeneratorBound && !strings.Contains(r.Reason, "does not count") {
			t.Errorf("generator-bound reason %q does not say it does not count", r.Reason)
		}
	}
	for _, other := range []float64{0, lim.other, lim.other + 0.1, 90} {
		for core := range 2 {
			r := measuredRun(c, 1, 5, 50, 100)
			if core == 0 {
				r.PeerCoreOtherPercent = other
			} else {
				r.GenCoreOtherPercent = other
				r.GenCorePercent = 100 // disturbed says more than generator-bound
			}
			judge(r, lim)
			if disturbed := r.Status == statusDisturbed; disturbed != (other > lim.other) {
				t.Errorf("others at %v%% of core %d: status %s", other, core, r.Status)
			}
		}
	}
	r := measuredRun(c, 1, 5, 100, 99)
	judge(r, lim)
	if r.Status != statusIncomplete {
		t.Errorf("99 of 100 connected: status %s", r.Status)
	}
	r = &RunResult{Cell: c}
	judge(r, lim)
	if r.Status != statusFailed {
		t.Errorf("no load report: status %s", r.Status)
	}
}

func TestOtherProcessesShare(t *testing.T) {
	r := measuredRun(Cell{}, 1, 5, 0, 100)
	r.Load.CPUPercent = 30
	// 10s: the peer used 4s of core 0, which was 70% busy; core 1 was 45%
	// busy, 30% the load tool's and 5% the origin's
	// (interrupt time, 1s on each core, is no process's)
	s0 := sample{at: time.Unix(100, 0)}
	s1 := sample{at: time.Unix(110, 0), peer: usage{Ticks: 4 * clockTicks}, origin: usage{Ticks: clockTicks / 2},
		cores: [2]cpuTimes{{Busy: 8 * clockTicks, Tasks: 7 * clockTicks, Total: 10 * clockTicks}, {Busy: 5.5 * clockTicks, Tasks: 4.5 * clockTicks, Total: 10 * clockTicks}}}
	r.figures(s0, s1)
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	if !near(r.PeerCoreOtherPercent, 70-40) || !near(r.GenCoreOtherPercent, 45-30-5) {
		t.Errorf("others: core 0 %v%%, core 1 %v%%", r.PeerCoreOtherPercent, r.GenCoreOtherPercent)
	}
}

func TestSummarizeCountsOnlyWhatIsOK(t *testing.T) {
	lim := limits{gen: 80, other: 20}
	ok := Cell{Workload: workSteady, Peer: peerFanout, Clients: 100, Rate: 10, Proto: protoH1}
	onlyBound := ok
	onlyBound.Peer = peerNchan
	never := ok
	never.Peer = peerReverseProxy
	var runs []*RunResult
	var okCPU, boundCPU []float64
	rng := rand.New(rand.NewPCG(9, 10))
	for rep := 1; rep <= 5; rep++ {
		cpu := 1 + rng.Float64()*10
		gen := 10 + rng.Float64()*60
		if rep == 3 {
			gen = 95 // this one does not count
		} else {
			okCPU = append(okCPU, cpu)
		}
		runs = append(runs, measuredRun(ok, rep, cpu, gen, 100))
		b := 1 + rng.Float64()*10
		boundCPU = append(boundCPU, b)
		runs = append(runs, measuredRun(onlyBound, rep, b, 99, 100))
		runs = append(runs, &RunResult{Cell: never, Rep: rep, Status: statusCannot, Reason: "cannot (2 fds per client)"})
	}
	for _, r := range runs {
		if r.Status == "" {
			judge(r, lim)
		}
	}
	sums := summarize(runs)
	if len(sums) != 3 {
		t.Fatalf("%d summaries, want 3", len(sums))
	}
	for _, s := range sums {
		if s.Runs != 5 {
			t.Errorf("%s: %d runs, want 5", s.Cell, s.Runs)
		}
		switch s.Cell {
		case ok:
			if s.Counted != 4 || s.CPUPerDeliveryUs != median(okCPU) || s.NotCounted {
				t.Errorf("ok cell: %+v, want the median of %v", s, okCPU)
			}
			if s.P99ms != 2*s.CPUPerDeliveryUs {
				t.Errorf("ok cell: p99 %v is not the median of the runs' p99", s.P99ms)
			}
		case onlyBound:
			if s.Counted != 0 || !s.NotCounted || s.Status != statusGeneratorBound || s.CPUPerDeliveryUs != median(boundCPU) {
				t.Errorf("generator-bound cell: %+v", s)
			}
		case never:
			if s.Counted != 0 || !strings.HasPrefix(s.Status, statusCannot) || !strings.Contains(s.Status, "2 fds") {
				t.Errorf("cell that cannot run: %+v", s)
			}
		}
	}
}

func TestRatio(t *testing.T) {
	if r := ratio(3, 2); r != 1.5 {
		t.Errorf("ratio(3, 2) = %v", r)
	}
	for _, c := range [][2]float64{{1, 0}, {math.NaN(), 1}, {1, math.NaN()}} {
		if !math.IsNaN(ratio(c[0], c[1])) {
			t.Errorf("ratio(%v, %v) is not NaN", c[0], c[1])
		}
	}
}
