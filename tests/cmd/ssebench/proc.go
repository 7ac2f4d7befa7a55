package main

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc: 100 on every
// Linux architecture Go runs on.
const clockTicks = 100

// procStat is what the harness reads from /proc/<pid>/stat.
type procStat struct {
	Name  string // the command name (comm)
	PPID  int
	Ticks uint64 // utime + stime, in clock ticks
}

// parseProcStat reads /proc/<pid>/stat content. The command name, in
// parentheses, may hold spaces and parentheses itself: the fields are
// counted from the last ')'.
func parseProcStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	open := bytes.IndexByte(b, '(')
	if i < 0 || open < 0 || open > i {
		return procStat{}, errors.New("no command name in stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("stat has %d fields after the name, want at least 13", len(f))
	}
	ppid, err1 := strconv.Atoi(f[1])
	utime, err2 := strconv.ParseUint(f[11], 10, 64)
	stime, err3 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return procStat{}, fmt.Errorf("stat: %w", err)
	}
	return procStat{Name: string(b[open+1 : i]), PPID: ppid, Ticks: utime + stime}, nil
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	return parseProcStat(b)
}

// parseRSS reads VmRSS, in KiB, from /proc/<pid>/status content.
func parseRSS(status []byte) (int64, error) {
	for line := range bytes.Lines(status) {
		rest, ok := bytes.CutPrefix(line, []byte("VmRSS:"))
		if !ok {
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("unexpected VmRSS line %q", line)
		}
		return strconv.ParseInt(f[0], 10, 64)
	}
	return 0, errors.New("no VmRSS in status")
}

func readRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseRSS(b)
}

// processes reads the stat of every process in /proc.
func processes() map[int]procStat {
	all := map[int]procStat{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := readProcStat(p); err == nil {
			all[p] = st
		}
	}
	return all
}

// processTree returns pid and its descendants (nginx: the master and its
// workers), from the parent links in /proc.
func processTree(pid int) []int {
	parent := map[int]int{}
	for p, st := range processes() {
		parent[p] = st.PPID
	}
	return descendants(pid, parent)
}

// busiest names the n processes, other than ours, that used the most CPU
// from a to b (seconds apart), as "name 12%" of a core. Processes that
// began or ended in between are not seen.
func busiest(a, b map[int]procStat, ours []int, seconds float64, n int) []string {
	type use struct {
		name  string
		ticks uint64
	}
	var uses []use
	for p, st := range b {
		if before, ok := a[p]; ok && !slices.Contains(ours, p) && st.Ticks > before.Ticks {
			uses = append(uses, use{st.Name, st.Ticks - before.Ticks})
		}
	}
	slices.SortFunc(uses, func(x, y use) int { return cmp.Compare(y.ticks, x.ticks) })
	var out []string
	for _, u := range uses[:min(n, len(uses))] {
		out = append(out, fmt.Sprintf("%s %.0f%%", u.name, 100*float64(u.ticks)/clockTicks/seconds))
	}
	return out
}

// descendants returns root and every process below it in parent (child →
// parent), root first.
func descendants(root int, parent map[int]int) []int {
	tree := []int{root}
	for i := 0; i < len(tree); i++ {
		for p, pp := range parent {
			if pp == tree[i] && p != root {
				tree = append(tree, p)
			}
		}
	}
	return tree
}

// usage is the CPU time and memory of a set of processes.
type usage struct {
	Ticks  uint64
	RSSKiB int64
}

// measure sums CPU ticks and RSS over pids; processes that are gone count
// as zero.
func measure(pids []int) usage {
	var u usage
	for _, p := range pids {
		if st, err := readProcStat(p); err == nil {
			u.Ticks += st.Ticks
		}
		if rss, err := readRSS(p); err == nil {
			u.RSSKiB += rss
		}
	}
	return u
}

// cpuTimes is one "cpuN" line of /proc/stat, in clock ticks.
type cpuTimes struct {
	Busy  uint64 // everything but idle and iowait
	Tasks uint64 // Busy without irq and softirq: processes, and steal
	Total uint64
}

// parseCPUTimes reads the line of CPU cpu from /proc/stat content. Busy is
// everything but idle and iowait (steal included: time the core was not
// ours to use). Tasks leaves out interrupt time too, which no process is
// charged with when the core was idle.
func parseCPUTimes(stat []byte, cpu int) (cpuTimes, error) {
	name := "cpu" + strconv.Itoa(cpu)
	for line := range bytes.Lines(stat) {
		f := strings.Fields(string(line))
		if len(f) < 5 || f[0] != name {
			continue
		}
		var t cpuTimes
		for i, s := range f[1:] {
			v, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				return cpuTimes{}, fmt.Errorf("/proc/stat %s: %w", name, err)
			}
			if i >= 8 { // guest and guest_nice are already in user and nice
				break
			}
			t.Total += v
			if i != 3 && i != 4 { // idle, iowait
				t.Busy += v
			}
			if i != 3 && i != 4 && i != 5 && i != 6 { // and irq, softirq
				t.Tasks += v
			}
		}
		return t, nil
	}
	return cpuTimes{}, fmt.Errorf("no %s line in /proc/stat", name)
}

func readCPUTimes(cpu int) cpuTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}
	}
	t, _ := parseCPUTimes(b, cpu)
	return t
}

// busyPercent is the share of the interval from a to b that the core was
// busy.
func busyPercent(a, b cpuTimes) float64 {
	if b.Total <= a.Total {
		return 0
	}
	return 100 * float64(b.Busy-a.Busy) / float64(b.Total-a.Total)
}

// tasksPercent is the share of the interval from a to b that the core ran
// processes (or was stolen).
func tasksPercent(a, b cpuTimes) float64 {
	if b.Total <= a.Total {
		return 0
	}
	return 100 * float64(b.Tasks-a.Tasks) / float64(b.Total-a.Total)
}
