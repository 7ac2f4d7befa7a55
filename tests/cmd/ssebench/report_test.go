package main

import (
	"bytes"
	"encoding/json"
	"io"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// fakeRuns makes judged runs of every peer with random figures.
func fakeRuns(t *testing.T, cfg *config) []*RunResult {
	t.Helper()
	rng := rand.New(rand.NewPCG(11, 12))
	var runs []*RunResult
	for _, pr := range cfg.plan() {
		r := &RunResult{Cell: pr.Cell, Rep: pr.Rep}
		if why := cannot(pr.Cell, cfg.maxFiles); why != "" {
			r.Status, r.Reason = statusCannot, why
			runs = append(runs, r)
			continue
		}
		rep := loadReport{
			Connected: int64(pr.Clients), EventsWindow: int64(pr.Clients) * 100,
			LatencyP50ms: rng.Float64() * 20, LatencyP99ms: 20 + rng.Float64()*20, LatencyMaxms: 50,
			Loss: rng.Float64() / 100, EventsPerSecond: float64(pr.Clients) * pr.Rate, CPUPercent: rng.Float64() * 50,
		}
		if pr.Burst > 0 {
			rep.LatencyEvery = burstLatencyEvery
		}
		raw, err := json.Marshal(rep)
		if err != nil {
			t.Fatal(err)
		}
		r.LoadRaw, r.Load = raw, &rep
		r.CPUPerDeliveryUs, r.RSSPerClientKiB = 5+rng.Float64()*20, 10+rng.Float64()*100
		r.GenCorePercent = rng.Float64() * 100
		r.GenCoreOtherPercent = rng.Float64() * 25
		judge(r, cfg.limits)
		runs = append(runs, r)
	}
	return runs
}

func TestResultsSurviveTheirFile(t *testing.T) {
	dir := t.TempDir()
	cfg, err := parseFlags([]string{"-quick", "-out", dir})
	if err != nil {
		t.Fatal(err)
	}
	cfg.maxFiles = 20000
	b := &bench{cfg: cfg, machine: Machine{CPU: "test CPU", Cores: 2}, runs: fakeRuns(t, cfg)}
	if err := b.save(); err != nil {
		t.Fatal(err)
	}
	var direct bytes.Buffer
	writeReport(&direct, b.machine, cfg, summarize(b.runs), b.runs)
	var again bytes.Buffer
	file := filepath.Join(dir, "results.json")
	if err := rereport(&again, []string{file}, ""); err != nil {
		t.Fatal(err)
	}
	if direct.String() != again.String() {
		t.Errorf("the report from results.json differs from the one of the run:\n%s\n----\n%s", direct.String(), again.String())
	}
	// bursts say their latencies are sampled; results from before the
	// sampling say nothing of it
	const sampled = "latencies from 1 client in 10"
	if !strings.Contains(direct.String(), sampled) {
		t.Errorf("the burst title does not say %q:\n%s", sampled, direct.String())
	}
	var older bytes.Buffer
	for _, r := range b.runs {
		if r.Load != nil {
			r.Load.LatencyEvery = 0
		}
	}
	writeReport(&older, b.machine, cfg, summarize(b.runs), b.runs)
	if strings.Contains(older.String(), "latencies from") {
		t.Errorf("a report of unsampled runs says they were sampled:\n%s", older.String())
	}
	// twice the same runs: every cell has twice the runs, the same medians
	twice := filepath.Join(dir, "twice.json")
	if err := rereport(io.Discard, []string{file, file}, twice); err != nil {
		t.Fatal(err)
	}
	both, err := readResults(twice)
	if err != nil {
		t.Fatal(err)
	}
	once := summarize(b.runs)
	if len(both.Runs) != 2*len(b.runs) || len(both.Summaries) != len(once) {
		t.Fatalf("%d runs, %d summaries from twice %d runs, %d summaries", len(both.Runs), len(both.Summaries), len(b.runs), len(once))
	}
	for i, s := range both.Summaries {
		if s.Runs != 2*once[i].Runs || s.Counted != 2*once[i].Counted || (s.Counted > 0 && s.CPUPerDeliveryUs != once[i].CPUPerDeliveryUs) {
			t.Errorf("%s: %+v from twice %+v", s.Cell, s, once[i])
		}
	}
	var res Results
	data, err := json.Marshal(Results{Summaries: summarize(b.runs)})
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &res); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(res.Summaries, summarize(b.runs)) {
		t.Error("summaries change through JSON")
	}
	report := direct.String()
	for _, p := range cfg.peers {
		if !strings.Contains(report, "| "+p+" |") {
			t.Errorf("peer %s is not in the report", p)
		}
	}
	for _, r := range b.runs {
		if (r.Status == statusGeneratorBound || r.Status == statusDisturbed) && !strings.Contains(report, r.Cell.String()+" rep") {
			t.Errorf("%s run %s is not listed apart", r.Status, r.Cell)
		}
	}
}
