// Command sseload is a load generator for Server-Sent Events endpoints: it
// holds many concurrent SSE clients on one URL for a fixed time and reports
// what they received.
//
//	go run ./cmd/sseload -url http://127.0.0.1:8080/events/ticker -clients 2000 -duration 20s -sources 4
//
// Each client is one plain HTTP/1.1 connection (http only, no TLS) that
// sends a GET with Accept: text/event-stream and reads the stream; clients
// do not reconnect. With -sources N the clients are spread over the source
// addresses 127.0.0.1 ... 127.0.0.N (loopback targets only), so that more
// connections fit than one source address has ephemeral ports.
//
// Connections are opened at most -connect-concurrency at a time. Once every
// attempt has succeeded or failed, the steady-state window starts: events
// per second and latencies are measured in it, until -duration (counted
// from the start) is over.
//
// The summary gives: clients connected and connect errors, streams that
// ended before the end, events received in all and per second in the
// window, the delivery latency p50/p99/max, and how many clients saw a gap
// (or a repeat) in the event ids. Latency is measured for events whose data
// is a JSON object with a "ts" field holding the send time in Unix
// nanoseconds (as the benchmark origin in ./origin writes it), against this
// machine's clock: sender and receiver must share it. Gaps are counted only
// for numeric ids; a client's first event sets its starting point.
//
// Bounds: at most 15000 clients and 10 minutes. The process needs a file
// descriptor per client (see ulimit -n).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/bits"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Hard bounds on what one run may ask for.
const (
	maxClients  = 15000
	maxDuration = 10 * time.Minute
	maxSources  = 254
	maxLineLen  = 1 << 20 // longest SSE line read; a longer one ends the client
)

type options struct {
	url            *url.URL
	clients        int
	duration       time.Duration
	sources        int
	concurrency    int
	connectTimeout time.Duration
	json           bool
}

func main() {
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "sseload:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res := run(ctx, opts)
	if opts.json {
		enc := json.NewEncoder(os.Stdout)
		if err := enc.Encode(res); err != nil {
			fmt.Fprintln(os.Stderr, "sseload:", err)
			os.Exit(1)
		}
		return
	}
	res.print(os.Stdout)
}

func parseFlags(args []string) (*options, error) {
	fs := flag.NewFlagSet("sseload", flag.ContinueOnError)
	rawURL := fs.String("url", "", "SSE endpoint to load, http://host:port/path (required)")
	o := &options{}
	fs.IntVar(&o.clients, "clients", 100, fmt.Sprintf("concurrent SSE clients (1..%d)", maxClients))
	fs.DurationVar(&o.duration, "duration", 20*time.Second, fmt.Sprintf("length of the run from the start, connecting included (max %s)", maxDuration))
	fs.IntVar(&o.sources, "sources", 1, fmt.Sprintf("spread clients over source addresses 127.0.0.1..127.0.0.N (1..%d; N>1 needs a loopback target)", maxSources))
	fs.IntVar(&o.concurrency, "connect-concurrency", 200, "connection attempts in flight at once")
	fs.DurationVar(&o.connectTimeout, "connect-timeout", 10*time.Second, "time allowed for a connection and its response head")
	fs.BoolVar(&o.json, "json", false, "print the summary as one JSON object")
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
	case u.Scheme != "http" || u.Host == "":
		return nil, errors.New("-url must be an http:// URL with a host (TLS is not supported)")
	case o.clients < 1 || o.clients > maxClients:
		return nil, fmt.Errorf("-clients must be between 1 and %d", maxClients)
	case o.duration <= 0 || o.duration > maxDuration:
		return nil, fmt.Errorf("-duration must be positive and at most %s", maxDuration)
	case o.sources < 1 || o.sources > maxSources:
		return nil, fmt.Errorf("-sources must be between 1 and %d", maxSources)
	case o.concurrency < 1:
		return nil, errors.New("-connect-concurrency must be positive")
	case o.connectTimeout <= 0:
		return nil, errors.New("-connect-timeout must be positive")
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
	LatencySamples  int64          `json:"latency_samples"`
	LatencyP50ms    float64        `json:"latency_p50_ms"`
	LatencyP99ms    float64        `json:"latency_p99_ms"`
	LatencyMaxms    float64        `json:"latency_max_ms"`
	GapClients      int64          `json:"gap_clients"`
	RepeatClients   int64          `json:"repeat_clients"`
}

func (r *Result) print(w io.Writer) {
	fmt.Fprintf(w, "sseload: %s, %d clients from %d source address(es)\n", r.URL, r.Clients, r.Sources)
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
		fmt.Fprintf(w, "  latency            p50 %.2fms, p99 %.2fms, max %.2fms (%d events with a ts, in the window)\n",
			r.LatencyP50ms, r.LatencyP99ms, r.LatencyMaxms, r.LatencySamples)
	} else {
		fmt.Fprintf(w, "  latency            no events with a \"ts\" field in the window\n")
	}
	fmt.Fprintf(w, "  id gaps            %d clients saw a gap, %d a repeated or decreasing id\n", r.GapClients, r.RepeatClients)
}

// load is the shared state of a run.
type load struct {
	opts      *options
	request   []byte
	measuring atomic.Bool // the steady-state window is open
	window    atomic.Int64
	total     atomic.Int64
	lat       histogram

	mu     sync.Mutex
	errors map[string]int
}

// clientResult is what one client saw.
type clientResult struct {
	connected  bool
	endedEarly bool
	events     int64
	gap        bool
	repeat     bool
}

func run(parent context.Context, opts *options) *Result {
	ctx, cancel := context.WithTimeout(parent, opts.duration)
	defer cancel()
	l := &load{opts: opts, errors: make(map[string]int)}
	l.request = fmt.Appendf(nil, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: sseload\r\n\r\n",
		opts.url.RequestURI(), opts.url.Host)

	start := time.Now()
	results := make([]clientResult, opts.clients)
	sem := make(chan struct{}, opts.concurrency)
	var attempts, done sync.WaitGroup
	attempts.Add(opts.clients)
	done.Add(opts.clients)
	for i := range opts.clients {
		src := net.IPv4(127, 0, 0, byte(1+i%opts.sources))
		go func() {
			defer done.Done()
			results[i] = l.client(ctx, src, sem, &attempts)
		}()
	}
	attempts.Wait()
	connectTime := time.Since(start)
	windowStart := time.Now()
	l.measuring.Store(true)
	<-ctx.Done()
	window := time.Since(windowStart)
	l.measuring.Store(false)
	done.Wait()

	res := &Result{
		URL:            opts.url.String(),
		Clients:        opts.clients,
		Sources:        opts.sources,
		ErrorKinds:     l.errors,
		ConnectSeconds: connectTime.Seconds(),
		WindowSeconds:  window.Seconds(),
		EventsTotal:    l.total.Load(),
		EventsWindow:   l.window.Load(),
	}
	if ctx.Err() != nil && parent.Err() != nil {
		fmt.Fprintln(os.Stderr, "sseload: interrupted, summary of the run so far")
	}
	res.EventsMinClient = math.MaxInt64
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
		if c.gap {
			res.GapClients++
		}
		if c.repeat {
			res.RepeatClients++
		}
	}
	if res.Connected == 0 {
		res.EventsMinClient = 0
	}
	if window > 0 {
		res.EventsPerSecond = float64(res.EventsWindow) / window.Seconds()
	}
	res.LatencySamples = l.lat.count()
	res.LatencyP50ms = l.lat.quantile(0.50).Seconds() * 1e3
	res.LatencyP99ms = l.lat.quantile(0.99).Seconds() * 1e3
	res.LatencyMaxms = time.Duration(l.lat.max.Load()).Seconds() * 1e3
	return res
}

// client runs one SSE client until ctx ends or its stream does. attempts
// is marked done once its connection attempt succeeded or failed.
func (l *load) client(ctx context.Context, src net.IP, sem chan struct{}, attempts *sync.WaitGroup) clientResult {
	var res clientResult
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		l.fail(errors.New("run ended before connecting"))
		attempts.Done()
		return res
	}
	conn, body, err := l.connect(ctx, src)
	<-sem
	attempts.Done()
	if err != nil {
		l.fail(err)
		return res
	}
	res.connected = true
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	defer conn.Close()
	err = l.read(body, &res)
	if ctx.Err() == nil {
		res.endedEarly = true
		if err == nil {
			err = io.EOF
		}
		fmt.Fprintf(os.Stderr, "sseload: a stream ended early: %v\n", err)
	}
	return res
}

// connect opens the connection and reads the response head; it returns the
// response body (chunked decoding included).
func (l *load) connect(ctx context.Context, src net.IP) (net.Conn, io.Reader, error) {
	d := net.Dialer{Timeout: l.opts.connectTimeout}
	if l.opts.sources > 1 {
		d.LocalAddr = &net.TCPAddr{IP: src}
	}
	conn, err := d.DialContext(ctx, "tcp", l.opts.url.Host)
	if err != nil {
		return nil, nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(l.opts.connectTimeout))
	if _, err := conn.Write(l.request); err != nil {
		conn.Close()
		return nil, nil, err
	}
	br := bufio.NewReaderSize(conn, 4096)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		conn.Close()
		return nil, nil, fmt.Errorf("status %s", resp.Status)
	}
	if ct := resp.Header.Get("Content-Type"); !bytes.HasPrefix([]byte(ct), []byte("text/event-stream")) {
		conn.Close()
		return nil, nil, fmt.Errorf("content type %q", ct)
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, resp.Body, nil
}

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

// read parses the event stream (lines ending in LF or CRLF) and accounts
// for each dispatched event.
func (l *load) read(body io.Reader, res *clientResult) error {
	br := bufio.NewReaderSize(body, 16<<10)
	var data []byte
	var hasData bool
	var id, lastID uint64
	var idOK, seen bool
	var long []byte
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			long = append(long, line...)
			if len(long) > maxLineLen {
				return errors.New("line too long")
			}
			continue
		}
		if err != nil {
			return err
		}
		if long != nil {
			line = append(long, line...)
			long = nil
		}
		line = bytes.TrimSuffix(bytes.TrimSuffix(line, []byte{'\n'}), []byte{'\r'})
		if len(line) == 0 { // dispatch
			if hasData {
				l.event(data, res)
				if idOK {
					switch {
					case !seen:
					case id > lastID+1:
						res.gap = true
					case id <= lastID:
						res.repeat = true
					}
					lastID, seen = id, true
				}
			}
			data, hasData = data[:0], false
			continue
		}
		if line[0] == ':' {
			continue
		}
		name, value, _ := bytes.Cut(line, []byte{':'})
		value = bytes.TrimPrefix(value, []byte{' '})
		switch string(name) {
		case "data":
			if hasData {
				data = append(data, '\n')
			}
			data = append(data, value...)
			hasData = true
		case "id":
			id, err = strconv.ParseUint(string(value), 10, 64)
			idOK = err == nil
		}
	}
}

var tsField = []byte(`"ts":`)

// event accounts for one dispatched event.
func (l *load) event(data []byte, res *clientResult) {
	now := time.Now()
	res.events++
	l.total.Add(1)
	if !l.measuring.Load() {
		return
	}
	l.window.Add(1)
	i := bytes.Index(data, tsField)
	if i < 0 {
		return
	}
	rest := bytes.TrimLeft(data[i+len(tsField):], " ")
	n := 0
	for n < len(rest) && rest[n] >= '0' && rest[n] <= '9' {
		n++
	}
	ts, err := strconv.ParseInt(string(rest[:n]), 10, 64)
	if err != nil {
		return
	}
	l.lat.record(now.Sub(time.Unix(0, ts)))
}

// histogram is a concurrent log-linear histogram of durations with
// microsecond resolution below 128µs and under 1/64 relative error above.
type histogram struct {
	buckets [histBuckets]atomic.Uint64
	n       atomic.Int64
	max     atomic.Int64 // exact, in nanoseconds
}

const (
	histSubBits = 6
	histLinear  = 2 << histSubBits // values below this are their own bucket
	histBuckets = histLinear + 58*(1<<histSubBits)
)

func (h *histogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.buckets[bucketOf(uint64(d/time.Microsecond))].Add(1)
	h.n.Add(1)
	for {
		m := h.max.Load()
		if int64(d) <= m || h.max.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

func bucketOf(us uint64) int {
	if us < histLinear {
		return int(us)
	}
	shift := bits.Len64(us) - histSubBits - 1
	return histLinear + (shift-1)<<histSubBits + int(us>>shift) - 1<<histSubBits
}

// upperBound is the largest value, in microseconds, that falls in bucket i.
func upperBound(i int) uint64 {
	if i < histLinear {
		return uint64(i)
	}
	i -= histLinear
	shift := i>>histSubBits + 1
	m := uint64(i&(1<<histSubBits-1)) + 1<<histSubBits
	return (m+1)<<shift - 1
}

func (h *histogram) count() int64 { return h.n.Load() }

// quantile returns the upper bound of the bucket holding quantile q.
func (h *histogram) quantile(q float64) time.Duration {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	var seen uint64
	for i := range h.buckets {
		seen += h.buckets[i].Load()
		if seen >= rank {
			return min(time.Duration(upperBound(i))*time.Microsecond, time.Duration(h.max.Load()))
		}
	}
	return time.Duration(h.max.Load())
}
