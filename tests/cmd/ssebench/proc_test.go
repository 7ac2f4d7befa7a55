package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestProcStatOfThisProcess(t *testing.T) {
	before, err := readProcStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if before.PPID != os.Getppid() {
		t.Errorf("ppid %d, want %d", before.PPID, os.Getppid())
	}
	busy := time.Now().Add(150 * time.Millisecond)
	x := 0
	for time.Now().Before(busy) {
		x++
	}
	after, err := readProcStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after.Ticks <= before.Ticks {
		t.Errorf("150ms of work: CPU ticks went from %d to %d (%d loops)", before.Ticks, after.Ticks, x)
	}
}

func TestProcStatWithAnOddCommandName(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, name := range []string{"nginx", "a b", "x) S 1 2 (y", ")", "(("} {
		ppid := rng.IntN(1 << 22)
		utime, stime := rng.Uint64N(1<<40), rng.Uint64N(1<<40)
		// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime ...
		line := fmt.Sprintf("4242 (%s) S %d 1 1 0 -1 4194560 10 0 0 0 %d %d 7 7 20 0 1 0 99 1000 50\n", name, ppid, utime, stime)
		st, err := parseProcStat([]byte(line))
		if err != nil {
			t.Fatalf("%q: %v", name, err)
		}
		if st.Name != name || st.PPID != ppid || st.Ticks != utime+stime {
			t.Errorf("%q: got %+v, want ppid %d, ticks %d", name, st, ppid, utime+stime)
		}
	}
	for _, bad := range []string{"", "12 no parenthesis S 1", "12 (x) S 1 2 3", "12 )x( S 1 2 3 4 5 6 7 8 9 10 11 12 13"} {
		if _, err := parseProcStat([]byte(bad)); err == nil {
			t.Errorf("parseProcStat(%q): no error", bad)
		}
	}
}

func TestRSSGrowsWithTouchedMemory(t *testing.T) {
	before, err := readRSS(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	b := make([]byte, size)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	after, err := readRSS(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if grew := after - before; grew < size/1024*3/4 {
		t.Errorf("RSS grew by %d KiB after touching %d KiB", grew, size/1024)
	}
	if _, err := parseRSS([]byte("Name:\tx\nVmRSS:\t12 MB\n")); err == nil {
		t.Error("a VmRSS in another unit: no error")
	}
	if _, err := parseRSS([]byte("Name:\tx\n")); err == nil {
		t.Error("no VmRSS: no error")
	}
}

func TestCPUTimes(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	f := make([]uint64, 10) // user nice system idle iowait irq softirq steal guest guest_nice
	var fields []string
	for i := range f {
		f[i] = rng.Uint64N(1 << 30)
		fields = append(fields, fmt.Sprint(f[i]))
	}
	stat := "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 " + strings.Join(fields, " ") + "\ncpu1 9 9 9 9 9 9 9 9 0 0\nintr 1 2\n"
	got, err := parseCPUTimes([]byte(stat), 0)
	if err != nil {
		t.Fatal(err)
	}
	idle := f[3] + f[4]
	busy := f[0] + f[1] + f[2] + f[5] + f[6] + f[7]
	if got.Busy != busy || got.Total != busy+idle || got.Tasks != busy-f[5]-f[6] {
		t.Errorf("got %+v, want busy %d of %d", got, busy, busy+idle)
	}
	if _, err := parseCPUTimes([]byte(stat), 7); err == nil {
		t.Error("a core that is not there: no error")
	}
	if p := busyPercent(cpuTimes{Busy: 10, Total: 100}, cpuTimes{Busy: 10 + busy, Total: 100 + busy + idle}); p < 0 || p > 100 {
		t.Errorf("busyPercent = %v", p)
	}
	live := readCPUTimes(0)
	if live.Total == 0 || live.Busy > live.Total {
		t.Errorf("this machine's core 0: %+v", live)
	}
}

func TestProcessTreeFindsChildren(t *testing.T) {
	parent := map[int]int{10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
	got := descendants(10, parent)
	slices.Sort(got)
	if want := []int{10, 11, 12, 13}; !slices.Equal(got, want) {
		t.Errorf("descendants(10) = %v, want %v", got, want)
	}
	cmd := exec.Command("sleep", "10")
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep command:", err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	tree := processTree(os.Getpid())
	if tree[0] != os.Getpid() || !slices.Contains(tree, cmd.Process.Pid) {
		t.Errorf("processTree(self) = %v, want self first and the child %d", tree, cmd.Process.Pid)
	}
	if u := measure(tree); u.RSSKiB <= 0 {
		t.Errorf("measure: %+v", u)
	}
}

func TestBusiestOthers(t *testing.T) {
	a := map[int]procStat{1: {Name: "init", Ticks: 10}, 2: {Name: "ours", Ticks: 0}, 3: {Name: "build", Ticks: 0}, 4: {Name: "test", Ticks: 5}, 5: {Name: "gone", Ticks: 1}}
	b := map[int]procStat{1: {Name: "init", Ticks: 11}, 2: {Name: "ours", Ticks: 900}, 3: {Name: "build", Ticks: 500}, 4: {Name: "test", Ticks: 255}, 6: {Name: "new", Ticks: 999}}
	got := busiest(a, b, []int{2}, 10, 2)
	if want := []string{"build 50%", "test 25%"}; !slices.Equal(got, want) {
		t.Errorf("busiest = %v, want %v", got, want)
	}
	if got := busiest(a, a, nil, 10, 3); len(got) != 0 {
		t.Errorf("nobody busy: %v", got)
	}
}
