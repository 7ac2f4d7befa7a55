// Command sseload is a load generator for Server-Sent Events endpoints: it
// holds many concurrent SSE clients on one URL for a fixed time and reports
// what they received.
//
//	go run ./cmd/sseload -url http://127.0.0.1:8080/events/ticker -clients 2000 -duration 20s -sources 4
//
// Each client is one connection that sends a GET with Accept:
// text/event-stream and reads the stream; clients do not reconnect. An
// http:// URL gives plain HTTP/1.1 clients; an https:// URL gives HTTP/1.1
// over TLS, or HTTP/2 over TLS with -http2 (still one connection per
// client). Certificates are not verified: this is a loopback benchmark tool.
// With -sources N the clients are spread over the source addresses
// 127.0.0.1 ... 127.0.0.N (loopback targets only), so that more connections
// fit than one source address has ephemeral ports.
//
// Plain HTTP/1.1 streams are read, on Linux, by one goroutine over epoll
// (-reader epoll, the default): no goroutine per client, one read(2) per
// ready socket, so that one core keeps up with tens of thousands of clients.
// After a wake-up that found few ready sockets it waits -coalesce (200µs)
// before it asks again, which takes most of the epoll_wait calls away at
// the price of receive times late by at most that much.
// TLS and HTTP/2 streams, or -reader goroutine, get a goroutine per client.
// Either way the receive time of an event is taken right after the read
// that returned its bytes, before parsing.
//
// Connections are opened at most -connect-concurrency at a time. Once every
// attempt has succeeded or failed, the steady-state window starts: events
// per second, latencies and this process's own CPU time are measured in it,
// until -window has passed or -duration (counted from the start) is over.
// With -expect-seq K the window also ends once every client got the
// sequence number K (see below).
//
// The summary gives: clients connected and connect errors, streams that
// ended before the end, events received in all and per second in the
// window, the delivery latency p50/p99/max, lost events, and how many
// clients saw a gap (or a repeat) in the sequence. Latency is measured for
// events whose data is a JSON object with a "ts" field holding the send
// time in Unix nanoseconds (as the benchmark origin in ./origin writes it),
// against this machine's clock: sender and receiver must share it. The
// sequence is the numeric event id (-gap-from id, the default), or the
// "seq" field of the data's JSON (-gap-from seq, for servers that make
// their own ids, such as nchan); a client's first event sets its starting
// point, and a jump counts the events it skipped as lost. With -expect-seq
// K every client is expected to receive the sequence 1..K exactly, and
// what it did not receive of it is lost.
//
// With -latency-every N, latencies are taken from every Nth client only
// (clients 0, N, 2N... in the order they are started, so spread over the
// order of connection); the other clients' events are counted by their
// data's "seq" fields, one search per event over whole lines, with the
// same sequence accounting (gaps, repeats, -expect-seq), but without
// splitting lines or reading times. Each "seq" field counts as an event,
// as the benchmark origin sends them: one per event. Parsing every event
// in full is what bounds one core at a few million deliveries a second,
// which a burst into a fan-out exceeds. Needs -gap-from seq.
//
// With -sync, it prints "sseload: window-start" and "sseload: window-end"
// on standard output as the window opens and closes, and after the end
// waits for a line on standard input (at most 10s) before closing the
// clients, so that a caller can sample the server with every client still
// connected. The summary follows (with -json, as one JSON line).
//
// Bounds: at most 19500 clients and 10 minutes. The process needs a file
// descriptor per client (see ulimit -n).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Hard bounds on what one run may ask for.
const (
	maxClients    = 19500
	maxDuration   = 10 * time.Minute
	maxSources    = 254
	maxLineLen    = 1 << 20 // longest SSE line read; a longer one ends the client
	maxEarlyNotes = 5       // streams that ended early, told one by one on stderr
	syncTimeout   = 10 * time.Second
)

// Where the sequence number of an event comes from.
const (
	gapFromID  = "id"
	gapFromSeq = "seq"
)

// Stream readers.
const (
	readerEpoll     = "epoll"
	readerGoroutine = "goroutine"
)

type options struct {
	url            *url.URL
	clients        int
	duration       time.Duration
	window         time.Duration // 0: until duration
	sources        int
	concurrency    int
	connectTimeout time.Duration
	http2          bool
	reader         string
	coalesce       time.Duration
	gapFrom        string
	expectSeq      uint64
	latencyEvery   int
	sync           bool
	json           bool
	cpuProfile     string
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "sseload:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, opts, os.Stdout, os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sseload:", err)
		os.Exit(1)
	}
	if opts.json {
		if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
			fmt.Fprintln(os.Stderr, "sseload:", err)
			os.Exit(1)
		}
		return
	}
	res.print(os.Stdout)
}

func parseFlags(args []string) (*options, error) {
	fs := flag.NewFlagSet("sseload", flag.ContinueOnError)
	rawURL := fs.String("url", "", "SSE endpoint to load, http:// or https://host:port/path (required)")
	o := &options{}
	fs.IntVar(&o.clients, "clients", 100, fmt.Sprintf("concurrent SSE clients (1..%d)", maxClients))
	fs.DurationVar(&o.duration, "duration", 20*time.Second, fmt.Sprintf("length of the run from the start, connecting included (max %s)", maxDuration))
	fs.DurationVar(&o.window, "window", 0, "length of the measuring window once all clients are connected (0: until -duration)")
	fs.IntVar(&o.sources, "sources", 1, fmt.Sprintf("spread clients over source addresses 127.0.0.1..127.0.0.N (1..%d; N>1 needs a loopback target)", maxSources))
	fs.IntVar(&o.concurrency, "connect-concurrency", 200, "connection attempts in flight at once")
	fs.DurationVar(&o.connectTimeout, "connect-timeout", 10*time.Second, "time allowed for a connection, its TLS handshake and its response head")
	fs.BoolVar(&o.http2, "http2", false, "speak HTTP/2 (https:// URLs only), one connection per client")
	fs.StringVar(&o.reader, "reader", readerEpoll, "how plain HTTP/1.1 streams are read: epoll (Linux) or goroutine (one per client)")
	fs.DurationVar(&o.coalesce, "coalesce", 200*time.Microsecond, "epoll reader: after a wake-up with few ready streams, wait this long before the next (fewer wake-ups; receive times may be late by as much)")
	fs.StringVar(&o.gapFrom, "gap-from", gapFromID, `sequence number of an event: "id" (numeric event id) or "seq" (the data JSON's "seq" field)`)
	fs.Uint64Var(&o.expectSeq, "expect-seq", 0, "every client should get the sequence 1..K: count what it misses as lost and end the window once all have K (0: off)")
	fs.IntVar(&o.latencyEvery, "latency-every", 1, "take latencies from every Nth client only; the others' events are counted by their data's \"seq\" fields (N>1 needs -gap-from seq), so that one core keeps up with bursts")
	fs.BoolVar(&o.sync, "sync", false, "print window-start/window-end lines and wait for a line on stdin before closing the clients")
	fs.BoolVar(&o.json, "json", false, "print the summary as one JSON object")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write this process's CPU profile of the window to this file")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	u, err := url.Parse(*rawURL)
	switch {
	case *rawURL == "":
		return nil, errors.New("-url is required")
	case err != nil:
		return nil, fmt.Errorf("-url: %v", err)
	case (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
		return nil, errors.New("-url must be an http:// or https:// URL with a host")
	case o.http2 && u.Scheme != "https":
		return nil, errors.New("-http2 needs an https:// URL (HTTP/2 over TLS)")
	case o.clients < 1 || o.clients > maxClients:
		return nil, fmt.Errorf("-clients must be between 1 and %d", maxClients)
	case o.duration <= 0 || o.duration > maxDuration:
		return nil, fmt.Errorf("-duration must be positive and at most %s", maxDuration)
	case o.window < 0:
		return nil, errors.New("-window must not be negative")
	case o.sources < 1 || o.sources > maxSources:
		return nil, fmt.Errorf("-sources must be between 1 and %d", maxSources)
	case o.concurrency < 1:
		return nil, errors.New("-connect-concurrency must be positive")
	case o.connectTimeout <= 0:
		return nil, errors.New("-connect-timeout must be positive")
	case o.coalesce < 0 || o.coalesce > 10*time.Millisecond:
		return nil, errors.New("-coalesce must be between 0 and 10ms")
	case o.reader != readerEpoll && o.reader != readerGoroutine:
		return nil, fmt.Errorf("-reader must be %q or %q", readerEpoll, readerGoroutine)
	case o.gapFrom != gapFromID && o.gapFrom != gapFromSeq:
		return nil, fmt.Errorf("-gap-from must be %q or %q", gapFromID, gapFromSeq)
	case o.latencyEvery < 1 || o.latencyEvery > maxClients:
		return nil, fmt.Errorf("-latency-every must be between 1 and %d", maxClients)
	case o.latencyEvery > 1 && o.gapFrom != gapFromSeq:
		return nil, errors.New("-latency-every above 1 counts events by the data's \"seq\" fields: it needs -gap-from seq")
	}
	if o.sources > 1 {
		ip := net.ParseIP(u.Hostname())
		if ip == nil || !ip.IsLoopback() {
			return nil, errors.New("-sources > 1 needs a loopback IP address as the URL host, e.g. 127.0.0.1")
		}
	}
	o.url = u
	return o, nil
}

// Result is the summary of a run.
type Result struct {
	URL             string         `json:"url"`
	Protocol        string         `json:"protocol"` // h1, h1-tls or h2-tls
	Reader          string         `json:"reader"`
	Clients         int            `json:"clients"`
	Sources         int            `json:"sources"`
	Connected       int64          `json:"connected"`
	ConnectErrors   int64          `json:"connect_errors"`
	ErrorKinds      map[string]int `json:"error_kinds,omitempty"`
	EndedEarly      int64          `json:"ended_early"`
	ConnectSeconds  float64        `json:"connect_seconds"` // time until every attempt was done
	WindowSeconds   float64        `json:"window_seconds"`  // steady-state window
	EventsTotal     int64          `json:"events_total"`
	EventsWindow    int64          `json:"events_window"`
	EventsPerSecond float64        `json:"events_per_second"` // in the window
	EventsMinClient int64          `json:"events_min_client"`
	EventsMaxClient int64          `json:"events_max_client"`
	LatencyEvery    int            `json:"latency_every,omitempty"` // latencies from every Nth client only
	LatencySamples  int64          `json:"latency_samples"`
	LatencyP50ms    float64        `json:"latency_p50_ms"`
	LatencyP99ms    float64        `json:"latency_p99_ms"`
	LatencyMaxms    float64        `json:"latency_max_ms"`
	GapFrom         string         `json:"gap_from"`
	GapClients      int64          `json:"gap_clients"`
	RepeatClients   int64          `json:"repeat_clients"`
	LostEvents      int64          `json:"lost_events"`
	Loss            float64        `json:"loss"` // lost / (lost + received), whole run
	ExpectSeq       uint64         `json:"expect_seq,omitempty"`
	CompleteClients int64          `json:"complete_clients,omitempty"` // got sequence number expect_seq
	CPUSeconds      float64        `json:"cpu_seconds"`                // this process, in the window
	CPUPercent      float64        `json:"cpu_percent"`                // of one core, in the window
}

func (r *Result) print(w io.Writer) {
	fmt.Fprintf(w, "sseload: %s (%s, %s reader), %d clients from %d source address(es)\n", r.URL, r.Protocol, r.Reader, r.Clients, r.Sources)
	fmt.Fprintf(w, "  clients connected  %d (connect errors %d, streams ended early %d), all attempts done in %.2fs\n",
		r.Connected, r.ConnectErrors, r.EndedEarly, r.ConnectSeconds)
	kinds := make([]string, 0, len(r.ErrorKinds))
	for k := range r.ErrorKinds {
		kinds = append(kinds, k)
	}
	sort.Slice(kinds, func(i, j int) bool { return r.ErrorKinds[kinds[i]] > r.ErrorKinds[kinds[j]] })
	for i, k := range kinds {
		if i == 5 {
			fmt.Fprintf(w, "    ... and %d more kinds\n", len(kinds)-5)
			break
		}
		fmt.Fprintf(w, "    %6d × %s\n", r.ErrorKinds[k], k)
	}
	fmt.Fprintf(w, "  events received    %d in all; %d in the %.1fs steady window = %.0f events/s\n",
		r.EventsTotal, r.EventsWindow, r.WindowSeconds, r.EventsPerSecond)
	fmt.Fprintf(w, "  events per client  min %d, max %d (connected clients, whole run)\n", r.EventsMinClient, r.EventsMaxClient)
	if r.LatencySamples > 0 {
		fmt.Fprintf(w, "  latency            p50 %.2fms, p99 %.2fms, max %.2fms (%d events with a ts, in the window",
			r.LatencyP50ms, r.LatencyP99ms, r.LatencyMaxms, r.LatencySamples)
		if r.LatencyEvery > 1 {
			fmt.Fprintf(w, ", from 1 client in %d", r.LatencyEvery)
		}
		fmt.Fprintln(w, ")")
	} else {
		fmt.Fprintf(w, "  latency            no events with a \"ts\" field in the window\n")
	}
	fmt.Fprintf(w, "  sequence (%s)      %d clients saw a gap, %d a repeated or decreasing number; %d events lost (%.3g%%)\n",
		r.GapFrom, r.GapClients, r.RepeatClients, r.LostEvents, 100*r.Loss)
	if r.ExpectSeq > 0 {
		fmt.Fprintf(w, "  complete           %d clients got sequence number %d\n", r.CompleteClients, r.ExpectSeq)
	}
	fmt.Fprintf(w, "  own CPU            %.2fs in the window, %.0f%% of one core\n", r.CPUSeconds, r.CPUPercent)
}

// load is the shared state of a run.
type load struct {
	opts      *options
	request   []byte
	measuring atomic.Bool // the steady-state window is open
	window    atomic.Int64
	total     atomic.Int64
	complete  atomic.Int64 // clients that got sequence number expectSeq
	ended     atomic.Int64 // clients whose stream ended early
	lat       histogram

	mu     sync.Mutex
	errors map[string]int
}

// clientResult is what one client saw.
type clientResult struct {
	connected  bool
	endedEarly bool
	events     int64
	seqSeen    bool
	lastSeq    uint64
	missing    int64 // events skipped by jumps in the sequence
	repeats    int64
	inRange    int64 // new sequence numbers in 1..expectSeq
	complete   bool
}

func newLoad(opts *options) *load {
	l := &load{opts: opts, errors: make(map[string]int)}
	l.request = fmt.Appendf(nil, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: sseload\r\n\r\n",
		opts.url.RequestURI(), opts.url.Host)
	return l
}

// run connects the clients, measures the window and sums up. With
// opts.sync it talks to its caller on out and in.
func run(parent context.Context, opts *options, out io.Writer, in io.Reader) (*Result, error) {
	ctx, cancel := context.WithTimeout(parent, opts.duration)
	defer cancel()
	l := newLoad(opts)
	var pl *poller
	if l.usesPoller() {
		var err error
		if pl, err = newPoller(l); err != nil {
			return nil, fmt.Errorf("epoll reader: %v (try -reader goroutine)", err)
		}
		go pl.run(ctx)
	}

	start := time.Now()
	results := make([]clientResult, opts.clients)
	sem := make(chan struct{}, opts.concurrency)
	var attempts, done sync.WaitGroup
	attempts.Add(opts.clients)
	done.Add(opts.clients)
	for i := range opts.clients {
		src := net.IPv4(127, 0, 0, byte(1+i%opts.sources))
		counting := i%opts.latencyEvery != 0
		go func() {
			defer done.Done()
			l.client(ctx, src, sem, &attempts, pl, &results[i], counting)
		}()
	}
	attempts.Wait()
	connectTime := time.Since(start)

	l.measuring.Store(true)
	windowStart := time.Now()
	cpu0 := cpuTime()
	stopProfile, err := startProfile(opts.cpuProfile)
	if err != nil {
		return nil, err
	}
	if opts.sync {
		fmt.Fprintln(out, "sseload: window-start")
	}
	l.waitWindow(ctx, countConnected(results))
	l.measuring.Store(false)
	window := time.Since(windowStart)
	cpu := cpuTime() - cpu0
	stopProfile()
	if opts.sync {
		fmt.Fprintln(out, "sseload: window-end")
		waitLine(in, syncTimeout)
	}
	interrupted := parent.Err() != nil
	cancel()
	done.Wait()
	if pl != nil {
		pl.wait()
	}
	if interrupted {
		fmt.Fprintln(os.Stderr, "sseload: interrupted, summary of the run so far")
	}
	res := l.summary(results)
	res.ConnectSeconds = connectTime.Seconds()
	res.WindowSeconds = window.Seconds()
	if window > 0 {
		res.EventsPerSecond = float64(res.EventsWindow) / window.Seconds()
		res.CPUPercent = 100 * cpu.Seconds() / window.Seconds()
	}
	res.CPUSeconds = cpu.Seconds()
	return res, nil
}

// usesPoller tells whether streams are read by the epoll reader.
func (l *load) usesPoller() bool {
	return l.opts.url.Scheme == "http" && l.opts.reader == readerEpoll
}

func countConnected(results []clientResult) int64 {
	var n int64
	for i := range results {
		if results[i].connected {
			n++
		}
	}
	return n
}

// waitWindow returns when the window is over: after opts.window, at the
// end of the run, or once every connected client is complete or gone.
func (l *load) waitWindow(ctx context.Context, connected int64) {
	var timeout <-chan time.Time
	if l.opts.window > 0 {
		t := time.NewTimer(l.opts.window)
		defer t.Stop()
		timeout = t.C
	}
	var poll <-chan time.Time
	if l.opts.expectSeq > 0 {
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		poll = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-timeout:
			return
		case <-poll:
			if l.complete.Load()+l.ended.Load() >= connected {
				return
			}
		}
	}
}

// waitLine reads one line from in, giving up after timeout.
func waitLine(in io.Reader, timeout time.Duration) {
	got := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(in).ReadString('\n')
		close(got)
	}()
	select {
	case <-got:
	case <-time.After(timeout):
	}
}

// summary adds up the clients' results.
func (l *load) summary(results []clientResult) *Result {
	o := l.opts
	res := &Result{
		URL:          o.url.String(),
		Protocol:     l.protocol(),
		Reader:       readerGoroutine,
		Clients:      o.clients,
		Sources:      o.sources,
		ErrorKinds:   l.errors,
		EventsTotal:  l.total.Load(),
		EventsWindow: l.window.Load(),
		GapFrom:      o.gapFrom,
		ExpectSeq:    o.expectSeq,
	}
	if o.latencyEvery > 1 {
		res.LatencyEvery = o.latencyEvery
	}
	if l.usesPoller() {
		res.Reader = readerEpoll
	}
	res.EventsMinClient = math.MaxInt64
	var received int64
	for _, c := range results {
		if !c.connected {
			res.ConnectErrors++
			continue
		}
		res.Connected++
		res.EventsMinClient = min(res.EventsMinClient, c.events)
		res.EventsMaxClient = max(res.EventsMaxClient, c.events)
		if c.endedEarly {
			res.EndedEarly++
		}
		if c.missing > 0 {
			res.GapClients++
		}
		if c.repeats > 0 {
			res.RepeatClients++
		}
		if c.complete {
			res.CompleteClients++
		}
		lost, got := c.lost(o.expectSeq)
		res.LostEvents += lost
		received += got
	}
	if res.Connected == 0 {
		res.EventsMinClient = 0
	}
	if res.LostEvents+received > 0 {
		res.Loss = float64(res.LostEvents) / float64(res.LostEvents+received)
	}
	res.LatencySamples = l.lat.count()
	res.LatencyP50ms = l.lat.quantile(0.50).Seconds() * 1e3
	res.LatencyP99ms = l.lat.quantile(0.99).Seconds() * 1e3
	res.LatencyMaxms = time.Duration(l.lat.max.Load()).Seconds() * 1e3
	return res
}

// lost returns the events a client lost and those it got that count: with
// expect > 0 against the whole sequence 1..expect, otherwise the jumps in
// what it saw.
func (c *clientResult) lost(expect uint64) (lost, got int64) {
	if expect > 0 {
		return int64(expect) - c.inRange, c.inRange
	}
	return c.missing, c.events
}

func (l *load) protocol() string {
	switch {
	case l.opts.url.Scheme == "http":
		return "h1"
	case l.opts.http2:
		return "h2-tls"
	default:
		return "h1-tls"
	}
}

// event accounts for one dispatched event of a client, received at now.
// ts is the data's send time (0: none); seq its sequence number if ok.
func (l *load) event(res *clientResult, now time.Time, ts int64, seq uint64, ok bool) {
	if ok {
		l.sequence(res, seq)
	}
	l.counted(res, 1)
	if ts > 0 && l.measuring.Load() {
		l.lat.record(now.Sub(time.Unix(0, ts)))
	}
}

// counted accounts for n events of a client, whose sequence numbers went
// to sequence already: in all, and in the window while it is open.
func (l *load) counted(res *clientResult, n int64) {
	if n == 0 {
		return
	}
	res.events += n
	l.total.Add(n)
	if l.measuring.Load() {
		l.window.Add(n)
	}
}

// sequence accounts for a client's next sequence number.
func (l *load) sequence(res *clientResult, seq uint64) {
	isNew := !res.seqSeen || seq > res.lastSeq
	switch {
	case !res.seqSeen:
	case seq > res.lastSeq+1:
		res.missing += int64(seq - res.lastSeq - 1)
	case seq <= res.lastSeq:
		res.repeats++
	}
	if isNew {
		res.lastSeq, res.seqSeen = seq, true
	}
	exp := l.opts.expectSeq
	if exp == 0 || !isNew || seq < 1 || seq > exp {
		return
	}
	res.inRange++
	if seq == exp && !res.complete {
		res.complete = true
		l.complete.Add(1)
	}
}

// fail counts a failed connection attempt by kind.
func (l *load) fail(err error) {
	kind := err.Error()
	var ne *net.OpError
	if errors.As(err, &ne) && ne.Err != nil {
		kind = ne.Op + ": " + ne.Err.Error() // without the addresses
	}
	l.mu.Lock()
	l.errors[kind]++
	l.mu.Unlock()
}

// endedEarly records a stream that ended before the run did.
func (l *load) endedEarly(res *clientResult, err error) {
	res.endedEarly = true
	if err == nil {
		err = io.EOF
	}
	if n := l.ended.Add(1); n <= maxEarlyNotes {
		fmt.Fprintf(os.Stderr, "sseload: a stream ended early: %v\n", err)
	}
}
