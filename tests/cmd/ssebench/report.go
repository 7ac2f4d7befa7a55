package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Machine describes where the runs were made.
type Machine struct {
	Date   time.Time `json:"date"`
	CPU    string    `json:"cpu"`
	Cores  int       `json:"cores"`
	Kernel string    `json:"kernel"`
	Go     string    `json:"go"`
	Commit string    `json:"commit"` // of the repository measured
	Caddy  string    `json:"caddy"`
	Nginx  string    `json:"nginx,omitempty"`
}

func describeMachine(repo, caddy, nginx string) Machine {
	m := Machine{Date: time.Now().UTC(), Cores: runtime.NumCPU(), Go: runtime.Version()}
	for line := range strings.Lines(output("lscpu")) {
		if v, ok := strings.CutPrefix(line, "Model name:"); ok {
			m.CPU = strings.TrimSpace(v)
		}
	}
	m.Kernel = strings.TrimSpace(output("uname", "-r"))
	m.Commit = strings.TrimSpace(output("git", "-C", repo, "rev-parse", "--short", "HEAD"))
	if strings.TrimSpace(output("git", "-C", repo, "status", "--porcelain")) != "" {
		m.Commit += " (with uncommitted changes)"
	}
	m.Caddy = strings.TrimSpace(output(caddy, "version"))
	if nginx != "" {
		m.Nginx = strings.TrimSpace(output(nginx, "-v"))
	}
	return m
}

// output runs a command and returns what it printed, "" if it failed.
func output(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return ""
	}
	return string(out)
}

// Results is the JSON file of an invocation.
type Results struct {
	Machine   Machine      `json:"machine"`
	Args      []string     `json:"args"`
	Summaries []*Summary   `json:"summaries"`
	Runs      []*RunResult `json:"runs"`
}

// save writes results.json (after every run, so that an interrupted
// invocation keeps what it measured).
func (b *bench) save() error {
	res := Results{Machine: b.machine, Args: b.cfg.args, Summaries: summarize(b.runs), Runs: b.runs}
	data, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	file := filepath.Join(b.cfg.out, "results.json")
	if err := os.WriteFile(file+".tmp", data, 0o644); err != nil {
		return err
	}
	return os.Rename(file+".tmp", file)
}

// report prints the tables to w and writes them to results.md.
func (b *bench) report(w io.Writer) error {
	var buf bytes.Buffer
	writeReport(&buf, b.machine, b.cfg, summarize(b.runs), b.runs)
	if _, err := w.Write(buf.Bytes()); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(b.cfg.out, "results.md"), buf.Bytes(), 0o644)
}

// line is one run in a line, for the progress output.
func (r *RunResult) line() string {
	s := fmt.Sprintf("%s rep %d%s: ", r.Cell, r.Rep, again(r.Attempt))
	if r.Load == nil {
		return s + r.Status + ": " + r.Reason
	}
	s += fmt.Sprintf("%.2f µs/delivery, p50 %.1f ms, p99 %.1f ms, loss %s, RSS %.1f KiB/client, gen core %.0f%% (load %.0f%%, origin %.0f%%), others %.0f%%/%.0f%%, %.0f events/s",
		r.CPUPerDeliveryUs, r.Load.LatencyP50ms, r.Load.LatencyP99ms, percent(r.Load.Loss), r.RSSPerClientKiB,
		r.GenCorePercent, r.LoadCPUPercent, r.OriginCPUPercent, r.PeerCoreOtherPercent, r.GenCoreOtherPercent, r.Load.EventsPerSecond)
	if r.Status != statusOK {
		s += " — " + strings.ToUpper(r.Status) + ": " + r.Reason
	}
	return s
}

// Descriptions of the workloads, for the report.
// latencyEvery is 1 in how many clients the load tool took latencies from
// in a workload's runs (results from before the option say nothing: every
// client).
func workloadTitle(w string, cfg *config, latencyEvery int) string {
	switch w {
	case workSteady:
		return fmt.Sprintf("Steady fan-out: %g events/s of %d B on one stream, %s window", cfg.rate, cfg.size, cfg.window)
	case workBig:
		return fmt.Sprintf("Many clients: one stream, %s window (peers with one descriptor per client)", cfg.window)
	case workBurst:
		t := fmt.Sprintf("Bursts: %d clients, %d events of %d B at each rate; window until every client has the last (at most %s more)",
			cfg.burstClients, cfg.burstEvents, cfg.size, burstDrain)
		if latencyEvery > 1 {
			t += fmt.Sprintf("; latencies from 1 client in %d, every client's sequence checked", latencyEvery)
		}
		return t
	case workTLS:
		return fmt.Sprintf("TLS (tls internal): %g events/s of %d B, one connection per client, %s window", cfg.rate, cfg.size, cfg.window)
	}
	return w
}

// caseOf names a cell's case within its workload.
func caseOf(c Cell) string {
	switch c.Workload {
	case workBig:
		return fmt.Sprintf("%d @ %g/s", c.Clients, c.Rate)
	case workBurst:
		return fmt.Sprintf("%g/s", c.Rate)
	case workTLS:
		return fmt.Sprintf("%d %s", c.Clients, c.Proto)
	}
	return fmt.Sprint(c.Clients)
}

// latencyEvery is the most clients per latency-sampled client in a
// workload's runs.
func latencyEvery(runs []*RunResult, work string) int {
	n := 1
	for _, r := range runs {
		if r.Workload == work && r.Load != nil {
			n = max(n, r.Load.LatencyEvery)
		}
	}
	return n
}

// ratioPeers are the denominators of the ratio tables.
var ratioPeers = []string{peerNchan, peerFloor, peerReverseProxy}

// writeReport writes the tables in Markdown.
func writeReport(w io.Writer, m Machine, cfg *config, sums []*Summary, runs []*RunResult) {
	fmt.Fprintf(w, "# ssebench, %s\n\n", m.Date.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(w, "%s, %d cores, Linux %s, %s; commit %s; %s; %s\n\n", m.CPU, m.Cores, m.Kernel, m.Go, m.Commit, firstLine(m.Caddy), m.Nginx)
	fmt.Fprintf(w, "Peer on core 0, load tool and origin on core 1. CPU per delivery: the peer's CPU time (all its processes) in the window ÷ events delivered in it. "+
		"RSS per client: (RSS with every client connected − idle RSS) ÷ clients. Medians over the runs that count: a run whose generator core "+
		"(core 1) is busier than %.0f%% (generator-bound), or where other processes took more than %.0f%% of a core (disturbed; made again up to %d times), does not count.\n",
		cfg.limits.gen, cfg.limits.other, cfg.retries)
	for _, work := range cfg.workloads {
		var ws []*Summary
		for _, s := range sums {
			if s.Workload == work {
				ws = append(ws, s)
			}
		}
		if len(ws) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n## %s\n\n", workloadTitle(work, cfg, latencyEvery(runs, work)))
		writeSummaryTable(w, ws)
		writeRatioTable(w, ws)
	}
	writeExcluded(w, runs)
}

func writeSummaryTable(w io.Writer, ws []*Summary) {
	fmt.Fprintln(w, "| case | peer | runs | CPU µs/delivery | p50 ms | p99 ms | max ms | loss | RSS KiB/client | gen core % | events/s |")
	fmt.Fprintln(w, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
	notCounted := false
	for _, s := range ws {
		runs := fmt.Sprintf("%d/%d", s.Counted, s.Runs)
		switch {
		case s.NotCounted:
			runs += " " + s.Status + "†"
			notCounted = true
		case s.Counted == 0:
			fmt.Fprintf(w, "| %s | %s | %s %s | | | | | | | | |\n", caseOf(s.Cell), s.Peer, runs, s.Status)
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %s | %.2f | %.1f | %.1f | %.1f | %s | %.1f | %.0f | %.0f |\n",
			caseOf(s.Cell), s.Peer, runs, s.CPUPerDeliveryUs, s.P50ms, s.P99ms, s.Maxms,
			percent(s.Loss), s.RSSPerClientKiB, s.GenCorePercent, s.EventsPerSecond)
	}
	if notCounted {
		fmt.Fprintln(w, "\n† no run counted: medians of the generator-bound (else disturbed) runs, for information only; latency and loss are then upper bounds; not in the ratios")
	}
}

// writeRatioTable writes sse_fanout's figures over each other peer's, per
// case.
func writeRatioTable(w io.Writer, ws []*Summary) {
	type key struct {
		c    string
		peer string
	}
	by := map[key]*Summary{}
	var cases []string
	for _, s := range ws {
		c := caseOf(s.Cell)
		if s.Peer == peerFanout {
			cases = append(cases, c)
		}
		if s.Counted > 0 { // generator-bound figures stay out of the ratios
			by[key{c, s.Peer}] = s
		}
	}
	var rows []string
	metrics := []struct {
		name string
		f    func(*Summary) float64
	}{
		{"CPU/delivery", func(s *Summary) float64 { return s.CPUPerDeliveryUs }},
		{"p99", func(s *Summary) float64 { return s.P99ms }},
		{"RSS/client", func(s *Summary) float64 { return s.RSSPerClientKiB }},
	}
	for _, c := range cases {
		f := by[key{c, peerFanout}]
		for _, m := range metrics {
			cells := make([]string, len(ratioPeers))
			some := false
			for i, p := range ratioPeers {
				cells[i] = "–"
				if o := by[key{c, p}]; f != nil && o != nil {
					if x := ratio(m.f(f), m.f(o)); !math.IsNaN(x) {
						cells[i] = fmt.Sprintf("%.2f", x)
						some = true
					}
				}
			}
			if some {
				rows = append(rows, fmt.Sprintf("| %s | %s | %s |", c, m.name, strings.Join(cells, " | ")))
			}
		}
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(w, "\n| case | metric | %s |\n", strings.Join(prefixed("sse_fanout / ", ratioPeers), " | "))
	fmt.Fprintf(w, "| --- | --- |%s\n", strings.Repeat(" ---: |", len(ratioPeers)))
	for _, row := range rows {
		fmt.Fprintln(w, row)
	}
}

// writeExcluded lists the runs that were made but do not count.
func writeExcluded(w io.Writer, runs []*RunResult) {
	first := true
	for _, r := range runs {
		if r.Status == statusOK || r.Status == statusCannot || r.Status == statusUnavailable {
			continue
		}
		if first {
			fmt.Fprintf(w, "\n## Runs that do not count\n\n")
			first = false
		}
		fmt.Fprintf(w, "- %s rep %d%s: %s: %s\n", r.Cell, r.Rep, again(r.Attempt), r.Status, r.Reason)
	}
}

func again(attempt int) string {
	if attempt == 0 {
		return ""
	}
	return fmt.Sprintf(" (again, %d)", attempt)
}

func prefixed(p string, xs []string) []string {
	out := make([]string, len(xs))
	for i, x := range xs {
		out[i] = p + x
	}
	return out
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// percent formats a fraction as a percentage, "0" for none.
func percent(f float64) string {
	if f == 0 {
		return "0"
	}
	return fmt.Sprintf("%.3g%%", 100*f)
}

// rereport prints the tables of the runs of one or more results.json
// files together (made with the same settings: the first file's give the
// titles), and writes them as one results file to jsonOut unless it is "".
func rereport(w io.Writer, files []string, jsonOut string) error {
	var all Results
	var cfg *config
	for _, file := range files {
		res, err := readResults(file)
		if err != nil {
			return err
		}
		if cfg == nil {
			if cfg, err = parseFlags(res.Args); err != nil {
				return fmt.Errorf("%s: its arguments: %w", file, err)
			}
			all.Machine, all.Args = res.Machine, res.Args
		}
		all.Runs = append(all.Runs, res.Runs...)
	}
	all.Summaries = summarize(all.Runs)
	writeReport(w, all.Machine, cfg, all.Summaries, all.Runs)
	if jsonOut == "" {
		return nil
	}
	data, err := json.MarshalIndent(all, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(jsonOut, data, 0o644)
}

// readResults reads a results.json, with each run's load summary.
func readResults(file string) (*Results, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var res Results
	if err := json.Unmarshal(data, &res); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	for _, r := range res.Runs {
		if len(r.LoadRaw) > 0 {
			r.Load = &loadReport{}
			if err := json.Unmarshal(r.LoadRaw, r.Load); err != nil {
				return nil, fmt.Errorf("%s: a run's load summary: %w", file, err)
			}
		}
	}
	return &res, nil
}
