package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Cores: the peer gets one to itself, the load tool and the origin share
// the other.
const (
	peerCore      = 0
	generatorCore = 1
)

// Time bounds of a run.
const (
	startTimeout   = 15 * time.Second // a process to listen
	idleSettle     = time.Second      // between the peer listening and the idle sample
	connectBound   = 90 * time.Second // for the load tool to connect its clients
	burstDrain     = 30 * time.Second // longest wait for a burst to arrive everywhere
	stopTimeout    = 10 * time.Second // after SIGTERM, before SIGKILL
	loadExitBound  = 60 * time.Second // for the load tool to close its clients and report
	clientsPerAddr = 2000             // clients per source address
	// burstLatencyEvery: in bursts the load tool takes latencies from 1
	// client in this many and only counts the others' events, so that its
	// core reads a burst as fast as a coalescing peer writes it
	burstLatencyEvery = 10
)

// loadReport is the part of sseload's JSON summary the harness uses.
type loadReport struct {
	Connected       int64   `json:"connected"`
	ConnectErrors   int64   `json:"connect_errors"`
	EndedEarly      int64   `json:"ended_early"`
	ConnectSeconds  float64 `json:"connect_seconds"`
	WindowSeconds   float64 `json:"window_seconds"`
	EventsWindow    int64   `json:"events_window"`
	EventsPerSecond float64 `json:"events_per_second"`
	LatencyEvery    int     `json:"latency_every"` // latencies from 1 client in this many (0: every client)
	LatencySamples  int64   `json:"latency_samples"`
	LatencyP50ms    float64 `json:"latency_p50_ms"`
	LatencyP99ms    float64 `json:"latency_p99_ms"`
	LatencyMaxms    float64 `json:"latency_max_ms"`
	GapClients      int64   `json:"gap_clients"`
	LostEvents      int64   `json:"lost_events"`
	Loss            float64 `json:"loss"`
	CompleteClients int64   `json:"complete_clients"`
	CPUSeconds      float64 `json:"cpu_seconds"`
	CPUPercent      float64 `json:"cpu_percent"`
}

// RunResult is everything measured in one run.
type RunResult struct {
	Cell
	Rep              int       `json:"rep"`
	Attempt          int       `json:"attempt,omitempty"` // retries of a disturbed run count from 1
	Started          time.Time `json:"started"`
	Status           string    `json:"status"`
	Reason           string    `json:"reason,omitempty"`
	WindowSeconds    float64   `json:"window_seconds"`      // as the harness sampled it
	Deliveries       int64     `json:"deliveries"`          // events received in the window
	PeerCPUSeconds   float64   `json:"peer_cpu_seconds"`    // in the window
	CPUPerDeliveryUs float64   `json:"cpu_us_per_delivery"` // peer CPU ÷ deliveries
	RSSIdleKiB       int64     `json:"rss_idle_kib"`        // before the clients
	RSSLoadedKiB     int64     `json:"rss_loaded_kib"`      // every client connected, end of window
	RSSPerClientKiB  float64   `json:"rss_kib_per_client"`
	PeerCorePercent  float64   `json:"peer_core_percent"` // core 0 busy, anything on it
	GenCorePercent   float64   `json:"gen_core_percent"`  // core 1 busy, anything on it
	// Time each core ran other processes than the run's, or was stolen by
	// the hypervisor, in percent (interrupt time left out).
	PeerCoreOtherPercent float64 `json:"peer_core_other_percent"`
	GenCoreOtherPercent  float64 `json:"gen_core_other_percent"`
	// The busiest other processes in the window, "name 12%" of a core.
	Others           []string        `json:"others,omitempty"`
	LoadCPUPercent   float64         `json:"load_cpu_percent"` // the load tool's own
	OriginCPUPercent float64         `json:"origin_cpu_percent"`
	Load             *loadReport     `json:"-"`
	LoadRaw          json.RawMessage `json:"load,omitempty"` // sseload's whole summary
	Dir              string          `json:"dir"`
	// peerFanoutStatus: bytes the status page's one viewer received
	StatusStreamBytes int64 `json:"status_stream_bytes,omitempty"`
}

// sample is the state of the processes and cores at one instant.
type sample struct {
	at     time.Time
	peer   usage
	origin usage
	cores  [2]cpuTimes
	all    map[int]procStat // every process, to name the others
}

func (b *bench) sample(peerPIDs []int, origin int) sample {
	return sample{
		at:     time.Now(),
		peer:   measure(peerPIDs),
		origin: measure([]int{origin}),
		cores:  [2]cpuTimes{readCPUTimes(peerCore), readCPUTimes(generatorCore)},
		all:    processes(),
	}
}

// process is a program the harness started, and stops by its PID.
type process struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}
}

// start runs bin pinned to core, output to a log file in dir.
func start(dir, name string, core int, env []string, bin string, args ...string) (*process, error) {
	log, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("taskset", append([]string{"-c", strconv.Itoa(core), bin}, args...)...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		log.Close()
		close(p.exited)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

// stop sends SIGTERM, then SIGKILL after stopTimeout, and waits.
func (p *process) stop() {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(stopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// waitListening waits until something accepts connections on port, or
// the process exits.
func waitListening(p *process, port int) error {
	deadline := time.Now().Add(startTimeout)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before listening (see %s.log)", p.name, p.name)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s is not listening on port %d after %s (see %s.log)", p.name, port, startTimeout, p.name)
}

// freePort asks the kernel for a free loopback port.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// runOne makes one run: origin, peer, load, samples. It returns a result
// whatever happens; a failure is in its status.
func (b *bench) runOne(ctx context.Context, pr plannedRun, index, attempt int) *RunResult {
	r := &RunResult{Cell: pr.Cell, Rep: pr.Rep, Attempt: attempt, Started: time.Now()}
	if why := cannot(pr.Cell, b.cfg.maxFiles); why != "" {
		r.Status, r.Reason = statusCannot, why
		return r
	}
	if why := b.unavailable[pr.Peer]; why != "" {
		r.Status, r.Reason = statusUnavailable, why
		return r
	}
	r.Dir = filepath.Join(b.cfg.out, "runs", fmt.Sprintf("%03d-%s-%s-%d-%g-%s-r%d", index, pr.Workload, pr.Peer, pr.Clients, pr.Rate, pr.Proto, pr.Rep))
	if attempt > 0 {
		r.Dir += fmt.Sprintf("-again%d", attempt)
	}
	if err := b.measure(ctx, r); err != nil {
		r.Status, r.Reason = statusFailed, err.Error()
		return r
	}
	judge(r, b.cfg.limits)
	return r
}

// measure runs the processes of r and fills in its figures.
func (b *bench) measure(ctx context.Context, r *RunResult) error {
	if err := os.MkdirAll(filepath.Join(r.Dir, "tmp"), 0o755); err != nil {
		return err
	}
	originPort, err1 := freePort()
	peerPort, err2 := freePort()
	if err := errors.Join(err1, err2); err != nil {
		return err
	}
	origin, err := b.startOrigin(r, originPort, peerPort)
	if err != nil {
		return err
	}
	defer origin.stop()
	if err := waitListening(origin, originPort); err != nil {
		return err
	}
	peer, url, err := b.startPeer(r, peerPort, originPort)
	if err != nil {
		return err
	}
	defer peer.stop()
	if err := waitListening(peer, peerPort); err != nil {
		return err
	}
	time.Sleep(idleSettle)
	pids := processTree(peer.pid())
	r.RSSIdleKiB = measure(pids).RSSKiB
	var ours []int
	if r.Peer == peerFanoutStatus {
		viewer, err := startStatusViewer(r.Dir, peerPort)
		if err != nil {
			return err
		}
		defer viewer.stop()
		ours = append(ours, viewer.pid())
		defer func() { r.StatusStreamBytes = fileSize(filepath.Join(r.Dir, statusStreamFile)) }()
	}
	return b.load(ctx, r, url, pids, origin, ours...)
}

// statusStreamFile is where the status page's viewer writes its stream.
const statusStreamFile = "status-stream.txt"

// startStatusViewer attaches one viewer, pinned to the generator core, to
// the status page's event stream, before the load tool's clients.
func startStatusViewer(dir string, port int) (*process, error) {
	p, err := start(dir, "status-viewer", generatorCore, nil, "curl", "-sN", "-H", "Accept: text/event-stream",
		"-o", filepath.Join(dir, statusStreamFile), fmt.Sprintf("http://127.0.0.1:%d/status", port))
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(startTimeout)
	for fileSize(filepath.Join(dir, statusStreamFile)) == 0 {
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("the status page's viewer received nothing in %s (see status-viewer.log)", startTimeout)
		}
		select {
		case <-p.exited:
			return nil, errors.New("the status page's viewer exited (see status-viewer.log)")
		case <-time.After(100 * time.Millisecond):
		}
	}
	return p, nil
}

func fileSize(name string) int64 {
	fi, err := os.Stat(name)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// startOrigin starts the benchmark origin; for nchan it also posts each
// event to nchan's publisher.
func (b *bench) startOrigin(r *RunResult, port, peerPort int) (*process, error) {
	args := []string{"-listen", fmt.Sprintf("127.0.0.1:%d", port), "-rate", strconv.FormatFloat(r.Rate, 'g', -1, 64),
		"-size", strconv.Itoa(b.cfg.size), "-quiet", "-duration", "1h"}
	if r.Peer == peerNchan {
		args = append(args, "-publish", fmt.Sprintf("http://127.0.0.1:%d%s", peerPort, nchanPublish))
	}
	if r.Burst > 0 {
		args = append(args, "-count", strconv.Itoa(r.Burst), "-wait-signal")
	}
	return start(r.Dir, "origin", generatorCore, nil, b.bin("origin"), args...)
}

// startPeer writes the peer's configuration and starts it on the peer
// core. It returns the URL the clients load.
func (b *bench) startPeer(r *RunResult, port, originPort int) (*process, string, error) {
	url := fmt.Sprintf("http://127.0.0.1:%d/events", port)
	switch r.Peer {
	case peerFanout, peerReverseProxy, peerFanoutStatus:
		tls := r.Proto != protoH1
		if tls {
			url = fmt.Sprintf("https://127.0.0.1:%d/events", port)
		}
		conf, err := caddyConfig{Port: port, OriginPort: originPort, Peer: r.Peer, TLS: tls, Storage: b.caddyStorage}.render()
		if err != nil {
			return nil, "", err
		}
		file := filepath.Join(r.Dir, "Caddyfile")
		if err := os.WriteFile(file, conf, 0o644); err != nil {
			return nil, "", err
		}
		env := []string{"HOME=" + r.Dir, "XDG_CONFIG_HOME=" + r.Dir, "XDG_DATA_HOME=" + r.Dir}
		bin := b.caddy
		if r.Peer == peerFanoutStatus {
			bin = b.caddyStatus
		}
		p, err := start(r.Dir, "peer", peerCore, env, bin, "run", "--config", file, "--adapter", "caddyfile")
		return p, url, err
	case peerNchan, peerNginx:
		c := nginxConfig{Dir: r.Dir, Port: port, OriginPort: originPort, MaxFiles: b.cfg.maxFiles}
		if r.Peer == peerNchan {
			c.NchanModule = b.cfg.nchanModule
			url = fmt.Sprintf("http://127.0.0.1:%d%s", port, nchanSubscribe)
		}
		conf, err := c.render()
		if err != nil {
			return nil, "", err
		}
		file := filepath.Join(r.Dir, "nginx.conf")
		if err := os.WriteFile(file, conf, 0o644); err != nil {
			return nil, "", err
		}
		p, err := start(r.Dir, "peer", peerCore, nil, b.cfg.nginx, "-p", r.Dir, "-c", file, "-e", filepath.Join(r.Dir, "error.log"))
		return p, url, err
	case peerFloor:
		p, err := start(r.Dir, "peer", peerCore, nil, b.bin("ssefloor"), "-listen", fmt.Sprintf("127.0.0.1:%d", port),
			"-upstream", fmt.Sprintf("http://127.0.0.1:%d/events", originPort))
		return p, url, err
	}
	return nil, "", fmt.Errorf("unknown peer %q", r.Peer)
}

// loadArgs are the load tool's arguments for r, and the longest it may
// run.
func (b *bench) loadArgs(r *RunResult, url string) ([]string, time.Duration) {
	window := b.cfg.window
	if r.Burst > 0 {
		window = time.Duration(float64(r.Burst)/r.Rate*float64(time.Second)) + burstDrain
	}
	sources := max(1, (r.Clients+clientsPerAddr-1)/clientsPerAddr)
	args := []string{"-url", url, "-clients", strconv.Itoa(r.Clients), "-sources", strconv.Itoa(sources),
		"-window", window.String(), "-duration", (window + connectBound).String(),
		"-gap-from", "seq", "-sync", "-json"}
	if r.Proto == protoH2TLS {
		args = append(args, "-http2")
	}
	if r.Burst > 0 {
		args = append(args, "-expect-seq", strconv.Itoa(r.Burst), "-latency-every", strconv.Itoa(burstLatencyEvery))
	}
	return args, window + connectBound + loadExitBound
}

// load runs the load tool, samples at the edges of its window and fills
// in r's figures.
func (b *bench) load(ctx context.Context, r *RunResult, url string, pids []int, origin *process, extra ...int) error {
	args, bound := b.loadArgs(r, url)
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, "taskset", append([]string{"-c", strconv.Itoa(generatorCore), b.bin("sseload")}, args...)...)
	errLog, err := os.Create(filepath.Join(r.Dir, "sseload.err"))
	if err != nil {
		return err
	}
	defer errLog.Close()
	cmd.Stderr = errLog
	stdin, err1 := cmd.StdinPipe()
	stdout, err2 := cmd.StdoutPipe()
	if err := errors.Join(err1, err2); err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting sseload: %w", err)
	}
	defer func() {
		stdin.Close() // lets it close its clients if it still waits for "go"
		_ = cmd.Wait()
	}()
	out := bufio.NewReader(stdout)
	var s0, s1 sample
	for _, want := range []string{"sseload: window-start", "sseload: window-end"} {
		line, err := out.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != want {
			return fmt.Errorf("sseload said %q instead of %q (see sseload.err): %v", line, want, err)
		}
		if want == "sseload: window-start" {
			s0 = b.sample(pids, origin.pid())
			if r.Burst > 0 {
				_ = origin.cmd.Process.Signal(syscall.SIGUSR1)
			}
			continue
		}
		s1 = b.sample(pids, origin.pid())
		if _, err := io.WriteString(stdin, "go\n"); err != nil {
			return fmt.Errorf("sseload: %w", err)
		}
	}
	summary, err := io.ReadAll(out)
	if err != nil {
		return fmt.Errorf("reading sseload's summary: %w", err)
	}
	r.LoadRaw = json.RawMessage(strings.TrimSpace(string(summary)))
	r.Load = &loadReport{}
	if err := json.Unmarshal(r.LoadRaw, r.Load); err != nil {
		return fmt.Errorf("sseload's summary: %w (see sseload.err)", err)
	}
	r.figures(s0, s1)
	ours := slices.Concat(pids, []int{origin.pid(), cmd.Process.Pid, os.Getpid(), os.Getppid()}, extra)
	r.Others = busiest(s0.all, s1.all, ours, r.WindowSeconds, 3)
	return nil
}

// figures computes the per-delivery and per-client figures from the
// samples at the edges of the window and the load tool's report.
func (r *RunResult) figures(s0, s1 sample) {
	window := s1.at.Sub(s0.at).Seconds()
	r.WindowSeconds = window
	r.Deliveries = r.Load.EventsWindow
	r.PeerCPUSeconds = float64(s1.peer.Ticks-s0.peer.Ticks) / clockTicks
	if r.Deliveries > 0 {
		r.CPUPerDeliveryUs = 1e6 * r.PeerCPUSeconds / float64(r.Deliveries)
	}
	r.RSSLoadedKiB = s1.peer.RSSKiB
	if r.Load.Connected > 0 {
		r.RSSPerClientKiB = float64(r.RSSLoadedKiB-r.RSSIdleKiB) / float64(r.Load.Connected)
	}
	r.PeerCorePercent = busyPercent(s0.cores[0], s1.cores[0])
	r.GenCorePercent = busyPercent(s0.cores[1], s1.cores[1])
	r.LoadCPUPercent = r.Load.CPUPercent
	if window > 0 {
		r.OriginCPUPercent = 100 * float64(s1.origin.Ticks-s0.origin.Ticks) / clockTicks / window
		r.PeerCoreOtherPercent = max(0, tasksPercent(s0.cores[0], s1.cores[0])-100*r.PeerCPUSeconds/window)
		r.GenCoreOtherPercent = max(0, tasksPercent(s0.cores[1], s1.cores[1])-r.LoadCPUPercent-r.OriginCPUPercent)
	}
}
