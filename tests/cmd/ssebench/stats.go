package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
)

// median of xs (NaN when empty); xs is not changed.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// Run statuses. Only statusOK runs count towards the medians.
const (
	statusOK             = "ok"
	statusGeneratorBound = "generator-bound"
	statusIncomplete     = "incomplete"
	statusDisturbed      = "disturbed"
	statusFailed         = "failed"
	statusCannot         = "cannot"
	statusUnavailable    = "unavailable"
)

// limits are what a run must stay within to count.
type limits struct {
	gen   float64 // percent of the generator core busy, anything on it
	other float64 // percent of either core busy with processes not ours (or stolen)
}

// judge sets a measured run's status: a run where not every client
// connected measured a smaller load; a run where other processes took more
// than lim.other of a core was disturbed; a run whose generator core was
// busier than lim.gen measured the generator rather than the peer.
func judge(r *RunResult, lim limits) {
	switch {
	case r.Load == nil:
		r.Status = statusFailed
	case r.Load.Connected < int64(r.Clients):
		r.Status = statusIncomplete
		r.Reason = fmt.Sprintf("%d of %d clients connected", r.Load.Connected, r.Clients)
	case r.PeerCoreOtherPercent > lim.other || r.GenCoreOtherPercent > lim.other:
		r.Status = statusDisturbed
		r.Reason = fmt.Sprintf("other processes took %.0f%% of core 0 and %.0f%% of core 1 (limit %.0f%%; busiest: %s): does not count",
			r.PeerCoreOtherPercent, r.GenCoreOtherPercent, lim.other, othersText(r.Others))
	case r.GenCorePercent > lim.gen:
		r.Status = statusGeneratorBound
		r.Reason = fmt.Sprintf("generator core %.0f%% busy (load tool %.0f%%, origin %.0f%%) > %.0f%%: does not count",
			r.GenCorePercent, r.LoadCPUPercent, r.OriginCPUPercent, lim.gen)
	default:
		r.Status = statusOK
	}
}

// Summary is the medians of one cell (workload, peer, clients, rate,
// protocol) over the runs that count.
type Summary struct {
	Cell
	Runs    int    `json:"runs"`
	Counted int    `json:"counted"`
	Status  string `json:"status,omitempty"` // a reason when no run counted
	// NotCounted: no run counted, and the figures are the medians of the
	// runs that were measured but did not count (generator-bound first,
	// else disturbed), shown for information; Status says which.
	NotCounted       bool    `json:"not_counted,omitempty"`
	CPUPerDeliveryUs float64 `json:"cpu_us_per_delivery"`
	P50ms            float64 `json:"p50_ms"`
	P99ms            float64 `json:"p99_ms"`
	Maxms            float64 `json:"max_ms"`
	Loss             float64 `json:"loss"`
	RSSPerClientKiB  float64 `json:"rss_kib_per_client"`
	GenCorePercent   float64 `json:"gen_core_percent"`
	EventsPerSecond  float64 `json:"events_per_second"`
	WindowSeconds    float64 `json:"window_seconds"`
}

// summarize makes the summary of each cell of runs, in the order the cells
// first appear.
func summarize(runs []*RunResult) []*Summary {
	var out []*Summary
	byCell := map[Cell]*Summary{}
	counted := map[Cell][]*RunResult{}
	bound := map[Cell][]*RunResult{}     // generator-bound
	disturbed := map[Cell][]*RunResult{} // or disturbed
	for _, r := range runs {
		s := byCell[r.Cell]
		if s == nil {
			s = &Summary{Cell: r.Cell}
			byCell[r.Cell] = s
			out = append(out, s)
		}
		s.Runs++
		switch r.Status {
		case statusGeneratorBound:
			bound[r.Cell] = append(bound[r.Cell], r)
		case statusDisturbed:
			disturbed[r.Cell] = append(disturbed[r.Cell], r)
		}
		if r.Status == statusOK {
			counted[r.Cell] = append(counted[r.Cell], r)
		} else if s.Status == "" || r.Status == statusCannot || r.Status == statusUnavailable {
			s.Status = r.Status
			if r.Reason != "" {
				s.Status += ": " + r.Reason
			}
		}
	}
	for _, s := range out {
		rs := counted[s.Cell]
		s.Counted = len(rs)
		switch {
		case len(rs) > 0:
			s.Status = ""
		case len(bound[s.Cell]) > 0:
			rs = bound[s.Cell]
			s.NotCounted, s.Status = true, statusGeneratorBound
		case len(disturbed[s.Cell]) > 0:
			rs = disturbed[s.Cell]
			s.NotCounted, s.Status = true, statusDisturbed
		default:
			continue
		}
		s.setMedians(rs)
	}
	return out
}

// setMedians sets the figures of s to the medians of rs.
func (s *Summary) setMedians(rs []*RunResult) {
	s.CPUPerDeliveryUs = medianOf(rs, func(r *RunResult) float64 { return r.CPUPerDeliveryUs })
	s.P50ms = medianOf(rs, func(r *RunResult) float64 { return r.Load.LatencyP50ms })
	s.P99ms = medianOf(rs, func(r *RunResult) float64 { return r.Load.LatencyP99ms })
	s.Maxms = medianOf(rs, func(r *RunResult) float64 { return r.Load.LatencyMaxms })
	s.Loss = medianOf(rs, func(r *RunResult) float64 { return r.Load.Loss })
	s.RSSPerClientKiB = medianOf(rs, func(r *RunResult) float64 { return r.RSSPerClientKiB })
	s.GenCorePercent = medianOf(rs, func(r *RunResult) float64 { return r.GenCorePercent })
	s.EventsPerSecond = medianOf(rs, func(r *RunResult) float64 { return r.Load.EventsPerSecond })
	s.WindowSeconds = medianOf(rs, func(r *RunResult) float64 { return r.Load.WindowSeconds })
}

func medianOf(rs []*RunResult, f func(*RunResult) float64) float64 {
	xs := make([]float64, len(rs))
	for i, r := range rs {
		xs[i] = f(r)
	}
	return median(xs)
}

// ratio is a/b, NaN when either is missing or b is zero.
func ratio(a, b float64) float64 {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return math.NaN()
	}
	return a / b
}

// othersText names the busiest other processes; the rest of what others
// took is processes that started or ended in the window (builds, tests).
func othersText(others []string) string {
	return strings.Join(append(others, "the rest short-lived"), ", ")
}
