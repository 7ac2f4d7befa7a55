package ssefanout

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// This file holds what the end-to-end tests share: a real Caddy loaded
// from a Caddyfile in this process, a real origin on loopback, streaming
// clients on real sockets, and the goroutine-leak check.

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// loadCaddyfile adapts and loads a Caddyfile, replacing the running config
// (a reload when one is running). It fails the test if Caddy refuses it.
func loadCaddyfile(t testing.TB, src string) {
	t.Helper()
	if err := tryLoadCaddyfile(src); err != nil {
		t.Fatalf("loading Caddyfile: %v\n%s", err, src)
	}
}

func tryLoadCaddyfile(src string) error {
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	cfg, _, err := adapter.Adapt([]byte(src), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return err
	}
	return caddy.Load(cfg, true)
}

// startCaddy loads a Caddyfile whose site serves on a fresh port and stops
// Caddy when the test ends. body is the site block's content.
func startCaddy(t testing.TB, body string) (base string) {
	t.Helper()
	return startCaddyWith(t, "", body)
}

func caddyfileFor(port int, body string) string {
	return caddyfileWith(port, "", body)
}

// caddyfileWith is caddyfileFor with options for the site's server (the
// content of the global servers block: protocols, trusted_proxies...).
func caddyfileWith(port int, servers, body string) string {
	if servers != "" {
		servers = "\tservers {\n\t\t" + servers + "\n\t}\n"
	}
	return fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	grace_period 2s
%s}
http://127.0.0.1:%d {
	bind 127.0.0.1
	%s
}
`, servers, port, body)
}

// startCaddyWith is startCaddy with options for the site's server.
func startCaddyWith(t testing.TB, servers, body string) (base string) {
	t.Helper()
	port := freePort(t)
	loadCaddyfile(t, caddyfileWith(port, servers, body))
	t.Cleanup(func() { _ = caddy.Stop() })
	base = fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)
	return base
}

// newH2CTransport returns a client transport that speaks HTTP/2 without
// TLS (h2c); its connections close at the test's end.
func newH2CTransport(t testing.TB) *http.Transport {
	h2c := &http.Transport{Protocols: new(http.Protocols)}
	h2c.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(h2c.CloseIdleConnections)
	return h2c
}

// waitUp waits until something answers on base.
func waitUp(t testing.TB, base string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), time.Second)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("caddy did not start listening on %s", base)
}

// origin is a real SSE origin on loopback whose events the test controls.
type origin struct {
	t    testing.TB
	srv  *http.Server
	ln   net.Listener
	URL  string
	mu   sync.Mutex
	subs map[string]map[*originConn]bool
	// handler, when set, answers instead of the default stream.
	handler atomic.Pointer[http.HandlerFunc]
	// prelude is written at the start of every stream.
	prelude atomic.Pointer[string]

	total    atomic.Int64 // connections ever
	requests chan *http.Request
}

type originConn struct {
	path string
	out  chan []byte
	drop chan struct{}
	req  *http.Request
}

// newOrigin starts an origin on a free port. Every request is recorded in
// o.requests (buffered; the newest are dropped when nobody reads them).
func newOrigin(t testing.TB) *origin {
	t.Helper()
	return newOriginOn(t, 0)
}

func (o *origin) serve(w http.ResponseWriter, r *http.Request) {
	o.total.Add(1)
	select {
	case o.requests <- r.Clone(context.Background()):
	default:
	}
	if hf := o.handler.Load(); hf != nil {
		(*hf)(w, r)
		return
	}
	o.stream(w, r)
}

// stream is the origin's default answer: an event stream fed by send.
func (o *origin) stream(w http.ResponseWriter, r *http.Request) {
	c := &originConn{path: r.URL.RequestURI(), out: make(chan []byte, 4096), drop: make(chan struct{}), req: r}
	o.mu.Lock()
	if o.subs[c.path] == nil {
		o.subs[c.path] = map[*originConn]bool{}
	}
	o.subs[c.path][c] = true
	o.mu.Unlock()
	defer func() {
		o.mu.Lock()
		delete(o.subs[c.path], c)
		o.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Origin", "yes")
	w.WriteHeader(http.StatusOK)
	if p := o.prelude.Load(); p != nil {
		_, _ = io.WriteString(w, *p)
	}
	http.NewResponseController(w).Flush()
	for {
		select {
		case b := <-c.out:
			if _, err := w.Write(b); err != nil {
				return
			}
			http.NewResponseController(w).Flush()
		case <-c.drop:
			return
		case <-r.Context().Done():
			return
		}
	}
}

// setHandler makes the origin answer with f instead of the default stream.
func (o *origin) setHandler(f http.HandlerFunc) {
	if f == nil {
		o.handler.Store(nil)
		return
	}
	o.handler.Store(&f)
}

// send writes raw bytes to every open stream of path (the request URI).
func (o *origin) send(path, raw string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for c := range o.subs[path] {
		c.out <- []byte(raw)
	}
}

// open returns how many streams of path are open.
func (o *origin) open(path string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.subs[path])
}

// openTotal returns how many streams are open on all paths.
func (o *origin) openTotal() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, m := range o.subs {
		n += len(m)
	}
	return n
}

// dropPath closes every open stream of path after what was sent so far.
func (o *origin) dropPath(path string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for c := range o.subs[path] {
		close(c.drop)
		delete(o.subs[path], c)
	}
}

func (o *origin) dropAll() {
	o.mu.Lock()
	paths := make([]string, 0, len(o.subs))
	for p := range o.subs {
		paths = append(paths, p)
	}
	o.mu.Unlock()
	for _, p := range paths {
		o.dropPath(p)
	}
}

// waitOpen waits until path has n open streams.
func (o *origin) waitOpen(t testing.TB, path string, n int, within time.Duration) {
	t.Helper()
	eventually(t, within, func() bool { return o.open(path) == n }, func() string {
		return fmt.Sprintf("origin streams open on %s: got %d, want %d", path, o.open(path), n)
	})
}

// eventually polls cond until it holds or within passes.
func eventually(t testing.TB, within time.Duration, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(msg())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sseClient is a streaming client on a real socket that keeps every byte
// of the body it received.
type sseClient struct {
	resp   *http.Response
	mu     sync.Mutex
	body   bytes.Buffer
	done   chan struct{}
	err    error
	cancel context.CancelFunc
}

// clientTransport is shared by the tests' clients: no connection reuse
// limits, no compression, loopback only.
func newClientTransport() *http.Transport {
	return &http.Transport{
		MaxIdleConnsPerHost: 1000,
		DisableCompression:  true,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}
}

var sharedTransport = newClientTransport()

// connect opens a stream and returns once the response headers arrived.
func connect(t testing.TB, url string, hdr http.Header) *sseClient {
	t.Helper()
	c, err := tryConnect(sharedTransport, url, hdr)
	// a connection reset or closed while Caddy swaps configs under its
	// listener (an idle connection to the old server) is retried, as an
	// EventSource would
	for i := 0; err != nil && i < 5 && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF)); i++ {
		time.Sleep(100 * time.Millisecond)
		c, err = tryConnect(sharedTransport, url, hdr)
	}
	if err != nil {
		t.Fatalf("connecting to %s: %v", url, err)
	}
	t.Cleanup(c.close)
	return c
}

// connectH2 connects a streaming client through rt, which must speak
// HTTP/2 (see newH2CTransport), and fails the test unless it did.
func connectH2(t testing.TB, rt http.RoundTripper, url string) *sseClient {
	t.Helper()
	c, err := tryConnect(rt, url, nil)
	if err != nil {
		t.Fatalf("connecting to %s: %v", url, err)
	}
	t.Cleanup(c.close)
	if c.resp.ProtoMajor != 2 {
		t.Fatalf("client spoke HTTP/%d, want 2", c.resp.ProtoMajor)
	}
	return c
}

func tryConnect(rt http.RoundTripper, url string, hdr http.Header) (*sseClient, error) {
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		cancel()
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		cancel()
		return nil, err
	}
	c := &sseClient{resp: resp, done: make(chan struct{}), cancel: cancel}
	go c.read()
	return c, nil
}

func (c *sseClient) read() {
	defer close(c.done)
	buf := make([]byte, 32<<10)
	for {
		n, err := c.resp.Body.Read(buf)
		if n > 0 {
			c.mu.Lock()
			c.body.Write(buf[:n])
			c.mu.Unlock()
		}
		if err != nil {
			c.mu.Lock()
			if err != io.EOF {
				c.err = err
			}
			c.mu.Unlock()
			return
		}
	}
}

// bytes returns what the client received so far.
func (c *sseClient) bytes() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.body.String()
}

// events returns the received body without keepalive comments.
func (c *sseClient) events() string {
	return stripComments(c.bytes())
}

var commentLine = regexp.MustCompile(`(?m)^:[^\n]*\n`)

func stripComments(s string) string {
	if !strings.HasPrefix(s, ":") && !strings.Contains(s, "\n:") {
		return s
	}
	return commentLine.ReplaceAllString(s, "")
}

// ended reports whether the body has ended.
func (c *sseClient) ended() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// cleanEnd reports whether the body ended with a normal end of stream.
func (c *sseClient) cleanEnd() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil
}

func (c *sseClient) close() {
	c.cancel()
	<-c.done
	c.resp.Body.Close()
}

// waitFor waits until the client's events (comments stripped) contain want.
func (c *sseClient) waitFor(t testing.TB, want string, within time.Duration) {
	t.Helper()
	eventually(t, within, func() bool { return strings.Contains(c.events(), want) }, func() string {
		return fmt.Sprintf("client did not receive %q within %v; got %q", truncate(want, 200), within, truncate(c.bytes(), 500))
	})
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + fmt.Sprintf("...(%d bytes)", len(s))
}

// waitEnded waits until the client's body has ended.
func (c *sseClient) waitEnded(t testing.TB, within time.Duration) {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(within):
		t.Fatalf("stream did not end within %v; got %q", within, truncate(c.bytes(), 500))
	}
}

// pkgGoroutines counts the goroutines running this package's non-test
// code: those with a frame of a function of this package's import path
// whose file is not a test file. Matching by import path, not by file
// name, keeps the check from going blind when files are added or renamed.
func pkgGoroutines() (int, string) {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	var sample string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if runsPackageCode(g) {
			n++
			if sample == "" {
				sample = g
			}
		}
	}
	return n, sample
}

// pkgPath is this package's import path, as stack traces name its
// functions.
var pkgPath = reflect.TypeFor[Handler]().PkgPath()

// runsPackageCode reports whether a goroutine's stack has a frame of this
// package's non-test code: a function line naming the package, followed
// by its file line.
func runsPackageCode(stack string) bool {
	lines := strings.Split(stack, "\n")
	for i := 0; i+1 < len(lines); i++ {
		fn := lines[i]
		if !strings.HasPrefix(fn, pkgPath+".") {
			continue
		}
		file, _, _ := strings.Cut(strings.TrimSpace(lines[i+1]), ":")
		if !strings.HasSuffix(file, "_test.go") {
			return true
		}
	}
	return false
}

// checkNoLeaks fails the test unless the package's goroutines go back to
// zero within 10 s: every client, stream and upstream loop has returned.
func checkNoLeaks(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, sample := pkgGoroutines()
		streams, clients := testutil.ToFloat64(metrics.streams), testutil.ToFloat64(metrics.clients)
		conns := upstreamConns()
		direct := testutil.ToFloat64(metrics.directClients)
		if n == 0 && streams == 0 && clients == 0 && conns == 0 && direct == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of the package still running (gauges: %v streams, %v clients, %v direct clients, %v upstream connections), e.g.:\n%s", n, streams, clients, direct, conns, sample)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// upstreamConns is the upstream connections gauge summed over its
// sources.
func upstreamConns() float64 {
	return testutil.ToFloat64(metrics.upstreamConns.WithLabelValues(sourceStream)) +
		testutil.ToFloat64(metrics.upstreamConns.WithLabelValues(sourceCatchUp))
}

// leakCheck registers checkNoLeaks to run after the test's other cleanups
// (Caddy stopped, clients closed): call it first in a test.
func leakCheck(t *testing.T) {
	t.Cleanup(func() { checkNoLeaks(t) })
}

// rawLines reads an HTTP/1.1 response head from a raw connection, for
// tests that need to see exactly what went over the wire.
func rawLines(r *bufio.Reader) (string, error) {
	var b strings.Builder
	for {
		line, err := r.ReadString('\n')
		b.WriteString(line)
		if err != nil || line == "\r\n" {
			return b.String(), err
		}
	}
}

// newOriginOn starts an origin on a given loopback port (for an origin that
// comes up after the proxy started trying it), or on a free one for 0.
func newOriginOn(t testing.TB, port int) *origin {
	t.Helper()
	o := &origin{t: t, subs: map[string]map[*originConn]bool{}, requests: make(chan *http.Request, 1024)}
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	o.ln = ln
	o.URL = "http://" + ln.Addr().String()
	o.srv = &http.Server{Handler: http.HandlerFunc(o.serve)}
	go func() { _ = o.srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		o.dropAll()
		_ = o.srv.Shutdown(ctx)
	})
	return o
}

// dialStream sends a stream's request on a raw socket, with a receive
// buffer of recvBuf bytes (0: the system's), and returns without reading.
func dialStream(t testing.TB, base, path string, recvBuf int) net.Conn {
	t.Helper()
	addr := strings.TrimPrefix(base, "http://")
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if recvBuf > 0 {
		_ = conn.(*net.TCPConn).SetReadBuffer(recvBuf)
	}
	t.Cleanup(func() { conn.Close() })
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", path, addr)
	return conn
}

// dialStuck opens a stream on a raw socket with a small receive buffer and
// never reads from it: a client that stopped reading.
func dialStuck(t testing.TB, base, path string) net.Conn {
	t.Helper()
	return dialStream(t, base, path, 4096)
}

// findStream returns the live stream whose upstream path is path.
func findStream(t testing.TB, path string) *stream {
	t.Helper()
	var found *stream
	eventually(t, 5*time.Second, func() bool {
		hubs.Range(func(_, v any) bool {
			h := v.(*hub)
			h.mu.Lock()
			defer h.mu.Unlock()
			for _, s := range h.streams {
				if s.target.Path == path {
					found = s
				}
			}
			return found == nil
		})
		return found != nil
	}, func() string { return "no stream for " + path })
	return found
}

// clientCount returns how many clients a stream has.
func clientCount(s *stream) int {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	return s.clients
}

// eventSource is a test client that behaves like a browser's EventSource:
// it parses the stream with the spec parser, keeps the last event ID and
// reconnects with Last-Event-ID whenever the stream ends, until stopped.
type eventSource struct {
	url    string
	mu     sync.Mutex
	events []string // "id|data" of every dispatched event
	lastID string
	opens  int
	ends   []time.Time
	clean  int // stream ends without a transport error
	status []int
	sentID []string // Last-Event-ID sent on each connection
	stop   chan struct{}
	done   chan struct{}
	// readDelay, when set, makes the client read 4 KiB at a time with this
	// pause before each read: a slow reader.
	readDelay atomic.Int64
}

// newEventSource starts a reconnecting client; it stops at test cleanup.
func newEventSource(t testing.TB, rt http.RoundTripper, url string) *eventSource {
	es := &eventSource{url: url, stop: make(chan struct{}), done: make(chan struct{})}
	go es.run(rt)
	t.Cleanup(es.close)
	return es
}

func (es *eventSource) close() {
	select {
	case <-es.stop:
	default:
		close(es.stop)
	}
	<-es.done
}

func (es *eventSource) run(rt http.RoundTripper) {
	defer close(es.done)
	for attempt := 0; attempt < 1000; attempt++ {
		select {
		case <-es.stop:
			return
		default:
		}
		es.once(rt)
		select {
		case <-es.stop:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// once runs one connection to its end.
func (es *eventSource) once(rt http.RoundTripper) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-es.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, es.url, nil)
	req.Header.Set("Accept", "text/event-stream")
	es.mu.Lock()
	id := es.lastID
	es.mu.Unlock()
	if id != "" {
		req.Header.Set("Last-Event-ID", id)
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	es.mu.Lock()
	es.opens++
	es.status = append(es.status, resp.StatusCode)
	es.sentID = append(es.sentID, id)
	es.mu.Unlock()
	if resp.StatusCode != http.StatusOK {
		return
	}
	p := newParser(16 << 20)
	p.setLastEventID(id)
	buf := make([]byte, 32<<10)
	for {
		chunk := buf
		if d := time.Duration(es.readDelay.Load()); d > 0 {
			time.Sleep(d)
			chunk = buf[:4<<10]
		}
		n, err := resp.Body.Read(chunk)
		p.feed(buf[:n], func(r *record) {
			es.mu.Lock()
			defer es.mu.Unlock()
			switch r.kind {
			case recEvent:
				es.events = append(es.events, r.id+"|"+string(r.data))
				es.lastID = r.id
			case recID, recSkipped:
				es.lastID = r.id
			}
		})
		if err != nil {
			es.mu.Lock()
			es.ends = append(es.ends, time.Now())
			if err == io.EOF {
				es.clean++
			}
			es.mu.Unlock()
			return
		}
	}
}

// snapshot returns the dispatched events and how many times it connected.
func (es *eventSource) snapshot() (events []string, opens int) {
	es.mu.Lock()
	defer es.mu.Unlock()
	return append([]string(nil), es.events...), es.opens
}

// The leak check sees goroutines of every file of the package, whatever
// its name: one deliberately left waiting in client.go is counted, and
// the count returns to zero once it returns.
func TestLeakCheckSeesEveryFile(t *testing.T) {
	set := hubSettings{history: 10, historyBytes: 1 << 20}
	h := newHub(&upstreamTemplate{scheme: "http", host: "x"}, nil, nil, &hubConfig{settings: set})
	defer h.Destruct()
	s := newStream(h, "k", nil, nil, "", set)
	hd := &Handler{StatusWait: caddy.Duration(time.Hour)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		hd.awaitFirstAnswer(ctx, s)
	}()
	eventually(t, 5*time.Second, func() bool {
		n, sample := pkgGoroutines()
		return n == 1 && strings.Contains(sample, "/client.go:")
	}, func() string {
		n, sample := pkgGoroutines()
		return fmt.Sprintf("the leak check counted %d goroutines for one waiting in client.go:\n%s", n, sample)
	})
	cancel()
	<-done
	if n, sample := pkgGoroutines(); n != 0 {
		t.Fatalf("%d goroutines counted after it returned:\n%s", n, sample)
	}

	// a frame of a file added later counts: the match is on the package's
	// import path, and only test files are left out
	frame := func(fn, file string) string {
		return "goroutine 7 [chan receive]:\n" + fn + "(...)\n\t" + file + ":12 +0x2c\ncreated by main.main\n\t/src/main.go:3 +0x10"
	}
	for _, tc := range []struct {
		stack string
		want  bool
	}{
		{frame(pkgPath+".(*relay).loop", "/src/caddy-sse-fanout/relay_added_later.go"), true},
		{frame(pkgPath+".newConcern", "/elsewhere/vendor/copy/concern.go"), true},
		{frame(pkgPath+".helper", "/src/caddy-sse-fanout/helper_test.go"), false},
		{frame("net/http.(*conn).serve", "/go/src/net/http/server.go"), false},
		{frame(pkgPath+"x.other", "/src/other/other.go"), false},
	} {
		if got := runsPackageCode(tc.stack); got != tc.want {
			t.Errorf("runsPackageCode(%q) = %v, want %v", tc.stack, got, tc.want)
		}
	}
}

// transportFrom returns a client transport whose connections leave
// from the loopback address ip, so that many short connections spread
// over several source addresses instead of exhausting one's ports.
func transportFrom(ip string) *http.Transport {
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	return &http.Transport{
		DialContext:         d.DialContext,
		DisableCompression:  true,
		DisableKeepAlives:   true,
		MaxIdleConnsPerHost: -1,
	}
}

// requestRecorder drains an origin's recorded requests so that a test can
// look them up by path at any time.
type requestRecorder struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func recordRequests(t *testing.T, o *origin) *requestRecorder {
	rec := &requestRecorder{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case r := <-o.requests:
				rec.mu.Lock()
				rec.reqs = append(rec.reqs, r)
				rec.mu.Unlock()
			case <-stop:
				return
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
	return rec
}

// byPath returns the recorded requests whose URI is path, oldest first.
func (rec *requestRecorder) byPath(path string) []*http.Request {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var out []*http.Request
	for _, r := range rec.reqs {
		if r.URL.RequestURI() == path {
			out = append(out, r)
		}
	}
	return out
}

var refusalBody = regexp.MustCompile(`^retry: ([0-9]+)\n$`)

// checkRefusal asserts the refusal an EventSource gets: a 200 event
// stream whose body is a lone `retry:` of 5 to 10 seconds and that ends.
// The response's request must carry a deadline, so that a body that does
// not end fails the read instead of hanging the test.
func checkRefusal(resp *http.Response) error {
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("refusal status %d, want 200", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		return fmt.Errorf("refusal Content-Type %q, want text/event-stream", ct)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("refusal body did not end cleanly after %q: %v", body, err)
	}
	m := refusalBody.FindSubmatch(body)
	if m == nil {
		return fmt.Errorf("refusal body %q, want exactly `retry: N\\n`", body)
	}
	if n, _ := strconv.Atoi(string(m[1])); n < 5000 || n > 10000 {
		return fmt.Errorf("refusal retry %d ms, want 5000..10000", n)
	}
	return nil
}

// check503 asserts the refusal any other client gets: a 503 with a
// Retry-After of 5 to 10 seconds.
func check503(resp *http.Response) error {
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable {
		return fmt.Errorf("refusal without Accept: status %d, want 503", resp.StatusCode)
	}
	ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	if err != nil || ra < 5 || ra > 10 {
		return fmt.Errorf("refusal Retry-After %q, want 5..10 seconds", resp.Header.Get("Retry-After"))
	}
	return nil
}

// getWithin makes a GET with a deadline for the whole exchange, body
// included; the caller closes the body.
func getWithin(rt http.RoundTripper, url string, accept bool, within time.Duration) (*http.Response, context.CancelFunc, error) {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	if accept {
		req.Header.Set("Accept", "text/event-stream")
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	return resp, cancel, nil
}

// heapInuse returns HeapInuse after two full collections.
func heapInuse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}
