// Command ssebench measures sse_fanout against its peers in one
// invocation: stock reverse_proxy in the same Caddy, nchan, nginx
// proxy_pass, and the write floor (cmd/ssefloor). It runs every peer in
// turn with interleaved repetitions, on loopback, with the peer pinned to
// core 0 and the load tool and the origin to core 1, and reports medians
// over the runs that count. See README.md beside this file.
//
//	cd tests && go run ./cmd/ssebench -out /tmp/ssebench           # the full comparison
//	cd tests && go run ./cmd/ssebench -quick -out /tmp/ssebench    # a few minutes
//	cd tests && go run ./cmd/ssebench -report /tmp/ssebench/results.json
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// config is what the flags say.
type config struct {
	out       string
	peers     []string
	workloads []string
	clients   []int
	reps      int
	window    time.Duration
	rate      float64
	size      int

	bigClients []int
	bigRates   []float64
	bigReps    int

	burstClients int
	burstRates   []float64
	burstEvents  int
	burstReps    int

	tlsClients int
	tlsReps    int

	limits      limits
	retries     int // of a disturbed run
	caddy       string
	caddyStatus string // Caddy for the sse_fanout_status peer; "": the same as caddy
	repo        string
	nginx       string
	nchanModule string
	maxFiles    int
	dryRun      bool
	report      []string // results.json files to print the tables of
	reportJSON  string   // where to write their runs together
	args        []string // the command line, kept with the results
}

// flagOutput receives the usage and flag errors.
var flagOutput io.Writer = os.Stderr

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "ssebench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "ssebench:", err)
		os.Exit(1)
	}
}

// listFlag is a comma-separated flag value.
type listFlag[T any] struct {
	v     *[]T
	parse func(string) (T, error)
}

func (l listFlag[T]) String() string {
	if l.v == nil {
		return ""
	}
	s := make([]string, len(*l.v))
	for i, x := range *l.v {
		s[i] = fmt.Sprint(x)
	}
	return strings.Join(s, ",")
}

func (l listFlag[T]) Set(s string) error {
	var out []T
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		x, err := l.parse(f)
		if err != nil {
			return err
		}
		out = append(out, x)
	}
	*l.v = out
	return nil
}

func ints(v *[]int) listFlag[int] { return listFlag[int]{v, strconv.Atoi} }
func floats(v *[]float64) listFlag[float64] {
	return listFlag[float64]{v, func(s string) (float64, error) { return strconv.ParseFloat(s, 64) }}
}
func words(v *[]string) listFlag[string] {
	return listFlag[string]{v, func(s string) (string, error) { return s, nil }}
}

func parseFlags(args []string) (*config, error) {
	cfg := &config{
		out:          "/tmp/ssebench",
		peers:        allPeers,
		workloads:    allWorkloads,
		clients:      []int{1000, 5000, 10000},
		reps:         5,
		window:       15 * time.Second,
		rate:         10,
		size:         200,
		bigClients:   []int{19000},
		bigRates:     []float64{10, 2},
		bigReps:      2,
		burstClients: 1000,
		burstRates:   []float64{1000, 2000, 5000, 10000},
		burstEvents:  1000,
		burstReps:    3,
		tlsClients:   1000,
		tlsReps:      3,
		limits:       limits{gen: 80, other: 20},
		retries:      1,
		nginx:        "nginx",
		nchanModule:  "/usr/lib/nginx/modules/ngx_nchan_module.so",
	}
	cfg.args = args
	fs := flag.NewFlagSet("ssebench", flag.ContinueOnError)
	fs.SetOutput(flagOutput)
	fs.StringVar(&cfg.out, "out", cfg.out, "directory for results.json, results.md and each run's logs and configurations")
	fs.Var(words(&cfg.peers), "peers", "peers to measure: "+strings.Join(allPeers, ",")+" (and "+peerFanoutStatus+": sse_fanout with its status page watched)")
	fs.Var(words(&cfg.workloads), "workloads", "workloads to run: "+strings.Join(allWorkloads, ","))
	fs.Var(ints(&cfg.clients), "clients", "steady workload: client counts")
	fs.IntVar(&cfg.reps, "reps", cfg.reps, "steady workload: repetitions")
	fs.DurationVar(&cfg.window, "window", cfg.window, "measuring window of the steady, big and tls workloads, once every client is connected")
	fs.Float64Var(&cfg.rate, "rate", cfg.rate, "events per second of the steady and tls workloads")
	fs.IntVar(&cfg.size, "size", cfg.size, "bytes of each event's data")
	fs.Var(ints(&cfg.bigClients), "big-clients", "big workload: client counts (only peers with one descriptor per client)")
	fs.Var(floats(&cfg.bigRates), "big-rates", "big workload: events per second")
	fs.IntVar(&cfg.bigReps, "big-reps", cfg.bigReps, "big workload: repetitions")
	fs.IntVar(&cfg.burstClients, "burst-clients", cfg.burstClients, "burst workload: clients")
	fs.Var(floats(&cfg.burstRates), "burst-rates", "burst workload: events per second during a burst")
	fs.IntVar(&cfg.burstEvents, "burst-events", cfg.burstEvents, "burst workload: events in a burst")
	fs.IntVar(&cfg.burstReps, "burst-reps", cfg.burstReps, "burst workload: repetitions")
	fs.IntVar(&cfg.tlsClients, "tls-clients", cfg.tlsClients, "tls workload: clients")
	fs.IntVar(&cfg.tlsReps, "tls-reps", cfg.tlsReps, "tls workload: repetitions")
	fs.Float64Var(&cfg.limits.gen, "gen-limit", cfg.limits.gen, "a run whose generator core (1) is busier than this percentage does not count")
	fs.Float64Var(&cfg.limits.other, "other-limit", cfg.limits.other, "a run where other processes take more than this percentage of a core does not count")
	fs.IntVar(&cfg.retries, "retries", cfg.retries, "make a run again, at once, at most this many times while other processes disturb it")
	fs.StringVar(&cfg.caddy, "caddy", "", "Caddy binary with sse_fanout (default: build the repository's ./cmd/caddy)")
	fs.StringVar(&cfg.caddyStatus, "caddy-status", "", "Caddy binary for the "+peerFanoutStatus+" peer (default: the same as -caddy)")
	fs.StringVar(&cfg.repo, "repo", "", "the repository's root (default: found from the working directory)")
	fs.StringVar(&cfg.nginx, "nginx", cfg.nginx, "nginx binary, for the nchan and nginx_proxy peers")
	fs.StringVar(&cfg.nchanModule, "nchan-module", cfg.nchanModule, "nchan's dynamic module")
	fs.BoolVar(&cfg.dryRun, "dry-run", false, "print the plan and its estimated time, run nothing")
	fs.Var(words(&cfg.report), "report", "print the tables of these results.json files (comma-separated, their runs together), run nothing")
	fs.StringVar(&cfg.reportJSON, "report-json", "", "with -report: also write the runs together as one results file here")
	quick := fs.Bool("quick", false, "a short check of everything: 1000 clients, one repetition, 5s windows, no big workload, two burst rates (explicit flags still apply)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if *quick {
		applyQuick(cfg, fs)
	}
	return cfg, cfg.check()
}

// applyQuick sets the quick mode's values of the flags not given.
func applyQuick(cfg *config, fs *flag.FlagSet) {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	quick := map[string]func(){
		"clients":     func() { cfg.clients = []int{1000} },
		"reps":        func() { cfg.reps = 1 },
		"window":      func() { cfg.window = 5 * time.Second },
		"workloads":   func() { cfg.workloads = []string{workSteady, workBurst, workTLS} },
		"burst-rates": func() { cfg.burstRates = []float64{1000, 5000} },
		"burst-reps":  func() { cfg.burstReps = 1 },
		"tls-reps":    func() { cfg.tlsReps = 1 },
	}
	for name, apply := range quick {
		if !set[name] {
			apply()
		}
	}
}

func (cfg *config) check() error {
	for _, p := range cfg.peers {
		if !slices.Contains(knownPeers, p) {
			return fmt.Errorf("-peers: unknown peer %q (known: %s)", p, strings.Join(knownPeers, ", "))
		}
	}
	for _, w := range cfg.workloads {
		if !slices.Contains(allWorkloads, w) {
			return fmt.Errorf("-workloads: unknown workload %q (known: %s)", w, strings.Join(allWorkloads, ", "))
		}
	}
	counts := slices.Concat(cfg.clients, cfg.bigClients, []int{cfg.burstClients, cfg.tlsClients})
	for _, n := range counts {
		if n < 1 || n > 19500 {
			return fmt.Errorf("client counts must be between 1 and 19500 (the load tool's bound), got %d", n)
		}
	}
	switch {
	case cfg.reps < 1 || cfg.bigReps < 1 || cfg.burstReps < 1 || cfg.tlsReps < 1:
		return errors.New("repetitions must be at least 1")
	case cfg.retries < 0 || cfg.retries > 10:
		return errors.New("-retries must be between 0 and 10")
	case cfg.window < time.Second || cfg.window > 5*time.Minute:
		return errors.New("-window must be between 1s and 5m")
	case cfg.rate <= 0 || cfg.burstEvents < 1 || slices.ContainsFunc(slices.Concat(cfg.bigRates, cfg.burstRates), func(r float64) bool { return r <= 0 || r > 100000 }):
		return errors.New("rates must be in (0, 100000] events per second and -burst-events at least 1")
	case cfg.size < 64 || cfg.size > 1<<20:
		return errors.New("-size must be between 64 and 1048576")
	}
	return nil
}

// bench is the state of one invocation.
type bench struct {
	cfg          *config
	binDir       string
	caddy        string
	caddyStatus  string            // for peerFanoutStatus
	caddyStorage string            // the TLS workload's internal CA, shared by its runs
	unavailable  map[string]string // peer → what to install
	machine      Machine
	runs         []*RunResult
}

func (b *bench) bin(name string) string { return filepath.Join(b.binDir, name) }

func run(ctx context.Context, cfg *config) error {
	if len(cfg.report) > 0 {
		return rereport(os.Stdout, cfg.report, cfg.reportJSON)
	}
	var err error
	if cfg.maxFiles, err = raiseFileLimit(); err != nil {
		return err
	}
	runs := cfg.plan()
	fmt.Printf("ssebench: %d runs, about %s, more if disturbed runs are made again\n", len(runs), cfg.estimate(runs).Round(time.Minute))
	if cfg.dryRun {
		for i, r := range runs {
			why := cannot(r.Cell, cfg.maxFiles)
			fmt.Printf("%3d  %s  rep %d  %s\n", i+1, r.Cell, r.Rep, why)
		}
		return nil
	}
	b := &bench{cfg: cfg, binDir: filepath.Join(cfg.out, "bin"), caddyStorage: filepath.Join(cfg.out, "caddy-storage")}
	if err := b.prepare(); err != nil {
		return err
	}
	for i, pr := range runs {
		if ctx.Err() != nil {
			fmt.Println("ssebench: interrupted; the results so far are in", cfg.out)
			break
		}
		for attempt := 0; attempt <= cfg.retries && ctx.Err() == nil; attempt++ {
			r := b.runOne(ctx, pr, i+1, attempt)
			b.runs = append(b.runs, r)
			fmt.Printf("[%d/%d] %s\n", i+1, len(runs), r.line())
			if err := b.save(); err != nil {
				return err
			}
			if r.Status != statusDisturbed {
				break
			}
		}
	}
	return b.report(os.Stdout)
}

// raiseFileLimit raises this process's open files limit to its hard limit
// (the peers and the load tool inherit it) and returns it.
func raiseFileLimit() (int, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, err
	}
	rl.Cur = rl.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, fmt.Errorf("raising the open files limit: %w", err)
	}
	return int(min(rl.Max, 1<<20)), nil
}

// prepare builds the tools and Caddy, finds nginx and nchan and notes the
// machine.
func (b *bench) prepare() error {
	if _, err := exec.LookPath("taskset"); err != nil {
		return errors.New("taskset not found: apt-get install -y util-linux")
	}
	repo, err := findRepo(b.cfg.repo)
	if err != nil {
		return err
	}
	if err := b.build(repo); err != nil {
		return err
	}
	b.unavailable = missingPeers(b.cfg)
	for p, why := range b.unavailable {
		if slices.Contains(b.cfg.peers, p) {
			fmt.Printf("ssebench: %s: %s\n", p, why)
		}
	}
	b.machine = describeMachine(repo, b.caddy, b.cfg.nginx)
	return nil
}

// build builds the tools into binDir, and Caddy with sse_fanout from the
// repository unless -caddy gave one.
func (b *bench) build(repo string) error {
	if err := os.MkdirAll(b.binDir, 0o755); err != nil {
		return err
	}
	fmt.Println("ssebench: building the load tool, the origin and the floor")
	if err := goBuild(filepath.Join(repo, "tests"), b.binDir+"/", "./cmd/sseload", "./cmd/sseload/origin", "./cmd/ssefloor"); err != nil {
		return err
	}
	b.caddy = b.cfg.caddy
	defer func() {
		b.caddyStatus = b.cfg.caddyStatus
		if b.caddyStatus == "" {
			b.caddyStatus = b.caddy
		}
	}()
	if b.caddy != "" {
		return nil
	}
	fmt.Println("ssebench: building Caddy with sse_fanout (./cmd/caddy)")
	b.caddy = b.bin("caddy")
	return goBuild(repo, b.caddy, "./cmd/caddy")
}

// missingPeers says what to install for each peer whose programs are not
// there, and makes cfg.nginx a path.
func missingPeers(cfg *config) map[string]string {
	const install = "not installed: apt-get install -y nginx-light libnginx-mod-nchan"
	missing := map[string]string{}
	path, err := exec.LookPath(cfg.nginx)
	if err != nil && cfg.nginx == "nginx" { // root's PATH may lack /usr/sbin
		path, err = exec.LookPath("/usr/sbin/nginx")
	}
	if err != nil {
		missing[peerNchan], missing[peerNginx] = install, install
		return missing
	}
	cfg.nginx = path
	if _, err := os.Stat(cfg.nchanModule); err != nil {
		missing[peerNchan] = install
	}
	return missing
}

// findRepo returns the repository's root: dir if given, else the closest
// directory above the working directory that holds tests/go.mod.
func findRepo(dir string) (string, error) {
	if dir != "" {
		return filepath.Abs(dir)
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "tests", "go.mod")); err == nil {
			if _, err := os.Stat(filepath.Join(d, "cmd", "caddy")); err == nil {
				return d, nil
			}
		}
		if filepath.Dir(d) == d {
			return "", errors.New("cannot find the repository (a directory with tests/go.mod and cmd/caddy) above the working directory: run from inside it or give -repo")
		}
	}
}

func goBuild(dir, out string, pkgs ...string) error {
	cmd := exec.Command("go", append([]string{"build", "-o", out}, pkgs...)...)
	cmd.Dir = dir
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s in %s: %v\n%s", strings.Join(pkgs, " "), dir, err, msg)
	}
	return nil
}
