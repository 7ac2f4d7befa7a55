package ssefanout

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The fast path: plaintext HTTP/1.1 clients are taken over after their
// response head and written directly, one non-blocking write per event
// while they keep up. These tests read the raw bytes (a chunked body that
// must stay valid through every transition) and the module's own gauges.

// rawStream opens a stream on a raw socket and returns a reader of its
// chunked body, decoded by net/http's own chunked reader, so that any
// framing error fails the read.
func rawStream(t testing.TB, base, path string, recvBuf int) (net.Conn, *http.Response) {
	t.Helper()
	conn := dialStream(t, base, path, recvBuf)
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	if resp.StatusCode != http.StatusOK || len(resp.TransferEncoding) != 1 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("status %d, transfer encoding %v: want a 200 chunked stream", resp.StatusCode, resp.TransferEncoding)
	}
	return conn, resp
}

// readUntil reads the body until it holds want, or fails after within.
func readUntil(t testing.TB, conn net.Conn, body io.Reader, got *strings.Builder, want string, within time.Duration) {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(within))
	defer conn.SetReadDeadline(time.Time{})
	buf := make([]byte, 32<<10)
	for !strings.Contains(got.String(), want) {
		n, err := body.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			t.Fatalf("reading the stream: %v; want %q; got %q", err, truncate(want, 100), truncate(got.String(), 300))
		}
	}
}

func direct() float64 { return testutil.ToFloat64(metrics.directClients) }

// A plaintext HTTP/1.1 client is written directly, its chunked body stays
// valid, and its hang-up is seen within a second with keepalives off (no
// write would ever fail), so its slot and its stream are freed.
func TestDirectClientHangupFreesItsStream(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n keepalive off\n linger off\n}")
	conn, resp := rawStream(t, base, "/d", 0)
	o.waitOpen(t, "/d", 1, 5*time.Second)
	eventually(t, 5*time.Second, func() bool { return direct() == 1 }, func() string {
		return fmt.Sprintf("%v direct clients, want the plaintext HTTP/1.1 one", direct())
	})
	var got strings.Builder
	for i := 1; i <= 3; i++ {
		o.send("/d", ev(i, fmt.Sprint("e", i)))
	}
	readUntil(t, conn, resp.Body, &got, ev(3, "e3"), 5*time.Second)
	if got.String() != ev(1, "e1")+ev(2, "e2")+ev(3, "e3") {
		t.Fatalf("direct client got %q", got.String())
	}

	closedAt := time.Now()
	conn.Close()
	o.waitOpen(t, "/d", 0, 5*time.Second) // linger off: the upstream closes with the last client
	if d := time.Since(closedAt); d > time.Second {
		t.Fatalf("a closed idle client was noticed after %v, want within 1 s", d)
	}
}

// A client whose socket fills up leaves the fast set for a goroutine of its
// own, finishes the partly written chunk, catches up, and comes back: its
// body is valid chunked encoding holding every event exactly once, in
// order.
func TestStalledClientCatchesUpAndReturns(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n history 5000\n history_bytes 64MiB\n client_send_buffer 8KiB\n keepalive off\n linger off\n}")
	conn, resp := rawStream(t, base, "/slow", 4096)
	o.waitOpen(t, "/slow", 1, 5*time.Second)
	eventually(t, 5*time.Second, func() bool { return direct() == 1 && goroutinesIn("(*client).loop") == 0 }, func() string {
		return "not a direct client in its stream's writer"
	})

	stalls := testutil.ToFloat64(metrics.directStalls)
	const n = 400
	payload := strings.Repeat("x", 1000)
	var want strings.Builder
	for i := 1; i <= n; i++ {
		o.send("/slow", ev(i, payload))
		want.WriteString(ev(i, payload))
	}
	// the client reads nothing for a while: its socket fills
	time.Sleep(500 * time.Millisecond)
	if got := testutil.ToFloat64(metrics.directStalls) - stalls; got < 1 {
		t.Fatalf("%v stalls: the client's socket never filled, the test did not exercise the slow path", got)
	}
	var got strings.Builder
	readUntil(t, conn, resp.Body, &got, ev(n, payload), 20*time.Second)
	// and then live events, written directly again
	o.send("/slow", ev(n+1, "live"))
	want.WriteString(ev(n+1, "live"))
	readUntil(t, conn, resp.Body, &got, ev(n+1, "live"), 10*time.Second)
	if got.String() != want.String() {
		t.Fatalf("the stalled client's events differ from what was sent (%d bytes, want %d)", got.Len(), want.Len())
	}
	// handed back: no goroutine serves it any more, its stream's writer
	// does
	eventually(t, 5*time.Second, func() bool { return goroutinesIn("(*client).loop") == 0 }, func() string {
		return "the caught-up client still has a goroutine of its own"
	})
	if direct() != 1 {
		t.Fatalf("%v direct clients", direct())
	}
}

// goroutinesIn counts the goroutines with fn in their stacks.
func goroutinesIn(fn string) int {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), fn+"(")
}

// serverSndbuf returns SO_SNDBUF of the socket in this process whose peer
// is conn's local end: the proxy's side of a test client's connection.
func serverSndbuf(t testing.TB, conn net.Conn) int {
	t.Helper()
	local := conn.LocalAddr().(*net.TCPAddr)
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		peer, err := syscall.Getpeername(fd)
		if sa, ok := peer.(*syscall.SockaddrInet4); err == nil && ok && sa.Port == local.Port && net.IP(sa.Addr[:]).Equal(local.IP) {
			n, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no socket of this process is the peer of %v", local)
	return 0
}

// HTTP/1.0, TLS-less HTTP/2 (h2c) and a server that speaks only HTTP/1.1
// behind Caddy's protocol check: the first two stay on net/http, the last
// is reached through Caddy's wrapper, written directly, and gets its
// client_send_buffer.
func TestDirectPathReach(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddyWith(t, "protocols h1", "sse_fanout "+o.URL+" {\n client_send_buffer 64KiB\n linger 200ms\n}")

	// HTTP/1.0 cannot carry a chunked body: served through net/http
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /old HTTP/1.0\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", strings.TrimPrefix(base, "http://"))
	o.waitOpen(t, "/old", 1, 5*time.Second)
	time.Sleep(100 * time.Millisecond)
	if d := direct(); d != 0 {
		t.Fatalf("an HTTP/1.0 client was taken over (%v direct clients)", d)
	}
	o.send("/old", ev(1, "old"))
	r := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var head strings.Builder
	for !strings.HasSuffix(head.String(), ev(1, "old")) {
		line, err := r.ReadString('\n')
		head.WriteString(line)
		if err != nil {
			t.Fatalf("HTTP/1.0 client: %v after %q", err, head.String())
		}
	}
	conn.Close()

	// HTTP/1.1 behind `protocols h1`: Caddy wraps the connection; the
	// module reaches through and takes it over
	c2, resp := rawStream(t, base, "/h1", 0)
	o.waitOpen(t, "/h1", 1, 5*time.Second)
	eventually(t, 5*time.Second, func() bool { return direct() == 1 }, func() string {
		return "an HTTP/1.1 client behind `protocols h1` was not written directly"
	})
	// Linux doubles what is asked, for its bookkeeping
	if sndbuf := serverSndbuf(t, c2); sndbuf != 2*64<<10 {
		t.Errorf("SO_SNDBUF of the client behind `protocols h1` is %d, want client_send_buffer's 64KiB (doubled by Linux: %d)", sndbuf, 2*64<<10)
	}
	var got strings.Builder
	o.send("/h1", ev(1, "h1"))
	readUntil(t, c2, resp.Body, &got, ev(1, "h1"), 5*time.Second)
}

// startLoggedCaddy starts Caddy with access logs and the module's logs in
// one file, with servers as the global servers options, and sse_fanout in
// front of origin.
func startLoggedCaddy(t *testing.T, servers, origin string) (base, logFile string) {
	t.Helper()
	logFile = filepath.Join(t.TempDir(), "access.log")
	port := freePort(t)
	loadCaddyfile(t, fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	grace_period 2s
	log {
		output file %s
		level INFO
	}
	servers {
		%s
	}
}
http://127.0.0.1:%d {
	bind 127.0.0.1
	log {
		output file %s
	}
	sse_fanout %s {
		linger off
	}
}
`, logFile, servers, port, logFile, origin))
	t.Cleanup(func() { _ = caddy.Stop() })
	base = fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)
	return base, logFile
}

// streamEndLogged waits for the `stream ended` line and Caddy's access log
// entry, checks what they must hold, and returns the bytes the first
// counts.
func streamEndLogged(t *testing.T, logFile string) (bytes int) {
	t.Helper()
	var access, ended string
	eventually(t, 5*time.Second, func() bool {
		data, _ := os.ReadFile(logFile)
		for _, l := range strings.Split(string(data), "\n") {
			switch {
			case strings.Contains(l, `"msg":"handled request"`):
				access = l
			case strings.Contains(l, `"msg":"stream ended"`):
				ended = l
			}
		}
		return access != "" && ended != ""
	}, func() string {
		data, _ := os.ReadFile(logFile)
		return "no stream ended line or no access log entry in the log:\n" + string(data)
	})
	if !strings.Contains(access, `"status":200`) {
		t.Errorf("access log entry: %q", access)
	}
	for _, want := range []string{`"status":200`, `"reason":"client closed"`, `"stream":"`, `"duration":`, `"bytes":`} {
		if !strings.Contains(ended, want) {
			t.Errorf("stream ended line %q lacks %s", ended, want)
		}
	}
	if i := strings.Index(ended, `"bytes":`); i >= 0 {
		_, _ = fmt.Sscanf(ended[i+len(`"bytes":`):], "%d", &bytes)
	}
	return bytes
}

// With access logs on, Caddy logs a hijacked stream when it is taken
// over; the module logs its end: status, bytes, duration, reason and the
// stream's hash.
func TestDirectStreamEndIsLogged(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base, logFile := startLoggedCaddy(t, "", o.URL)
	conn, resp := rawStream(t, base, "/logged", 0)
	o.waitOpen(t, "/logged", 1, 5*time.Second)
	var got strings.Builder
	o.send("/logged", ev(1, "x"))
	readUntil(t, conn, resp.Body, &got, ev(1, "x"), 5*time.Second)
	if d := direct(); d != 1 {
		t.Errorf("%v clients written directly, want the one", d)
	}
	conn.Close()
	if bytes := streamEndLogged(t, logFile); bytes < len(ev(1, "x")) {
		t.Errorf("stream ended line counts %d bytes, want at least the event's %d", bytes, len(ev(1, "x")))
	}
}

// An HTTP/2 client over cleartext (h2c) behind a server that speaks only
// h2c, which Caddy wraps: it stays on net/http (streams share its
// connection), and its connection still gets client_send_buffer.
func TestSendBufferUnderH2c(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddyWith(t, "protocols h2c", "sse_fanout "+o.URL+" {\n client_send_buffer 64KiB\n linger 200ms\n}")

	var dialed net.Conn
	h2c := newH2CTransport(t)
	h2c.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		dialed = c
		return c, err
	}
	c := connectH2(t, h2c, base+"/h2c")
	o.waitOpen(t, "/h2c", 1, 5*time.Second)
	o.send("/h2c", ev(1, "h2c"))
	c.waitFor(t, ev(1, "h2c"), 5*time.Second)
	if d := direct(); d != 0 {
		t.Errorf("an HTTP/2 client was taken over (%v direct clients)", d)
	}
	if sndbuf := serverSndbuf(t, dialed); sndbuf != 2*64<<10 {
		t.Errorf("SO_SNDBUF of the h2c client's connection is %d, want client_send_buffer's 64KiB (doubled by Linux: %d)", sndbuf, 2*64<<10)
	}
}

// A handler with its own retry strips the origin's retry lines on the fast
// path too, also when a pass's batch is the origin's retry line alone, and
// counts only what it wrote.
func TestFastPathStripsALoneRetryLine(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `sse_fanout /s/* `+o.URL+` {
		retry 5s
		keepalive 1m
	}`)
	const path = "/s/retry"
	c := connect(t, base+path, nil)
	o.waitOpen(t, path, 1, 5*time.Second)
	o.send(path, ev(1, "x"))
	c.waitFor(t, ev(1, "x"), 5*time.Second)
	s := findStream(t, path)
	eventually(t, 5*time.Second, func() bool { return s.fan.active.Load() }, func() string { return "the client never reached the fast path" })
	o.send(path, "retry: 1500\n\n")
	time.Sleep(300 * time.Millisecond) // a pass of its own
	o.send(path, ev(2, "y"))
	c.waitFor(t, ev(2, "y"), 5*time.Second)
	if strings.Contains(c.bytes(), "retry: 1500") {
		t.Fatalf("the origin's retry reached a client of a handler with its own: %q", c.bytes())
	}
	if got := s.stats.bytes.Load(); got != uint64(len(c.bytes())) {
		t.Fatalf("the stream counted %d bytes sent, the client read %d", got, len(c.bytes()))
	}
}

// A client written directly holds a few KiB of the proxy's heap: once
// its connection is taken over, neither net/http's connection (8 KiB of
// buffers) nor the request and Caddy's per-request state stay reachable
// from it. The clients here are bare sockets that hold nothing of the
// heap themselves.
func TestDirectClientsCostLittle(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n keepalive off\n}")
	dialStuck(t, base, "/mem")
	o.waitOpen(t, "/mem", 1, 5*time.Second)
	eventually(t, 5*time.Second, func() bool { return direct() == 1 }, func() string { return "the first client was not taken over" })
	before := heapInuse()
	const n = 1000
	for range n {
		dialStuck(t, base, "/mem")
	}
	eventually(t, 10*time.Second, func() bool { return direct() == n+1 }, func() string { return fmt.Sprintf("%v of %d clients taken over", direct(), n+1) })
	time.Sleep(200 * time.Millisecond) // handlers return after the take-over
	perClient := (int64(heapInuse()) - int64(before)) / n
	t.Logf("heap per direct client: %d bytes", perClient)
	if perClient > 4096 {
		t.Errorf("a direct client holds %d bytes of heap, want at most 4 KiB", perClient)
	}
}

// yieldToPass returns at once when no pass is underway; otherwise it
// waits for the pass's end, which releases every waiter together, or for
// the client to go away.
func TestYieldToPass(t *testing.T) {
	f := newFanout(nil)
	if !f.yieldToPass(context.Background()) { // would hang if it waited
		t.Fatal("no pass underway: the client was turned away")
	}
	f.mu.Lock()
	f.inPass = true // as pass sets it
	f.mu.Unlock()
	released := make(chan bool, 2)
	for range 2 {
		go func() { released <- f.yieldToPass(context.Background()) }()
	}
	ctx, cancel := context.WithCancel(context.Background())
	gone := make(chan bool, 1)
	go func() { gone <- f.yieldToPass(ctx) }()
	select {
	case stayed := <-released:
		t.Fatalf("a client returned during the pass (stayed %v)", stayed)
	case <-gone:
		t.Fatal("a client returned during the pass before it went away")
	case <-time.After(100 * time.Millisecond):
	}
	cancel()
	if <-gone {
		t.Fatal("a client gone while waiting was told to go on")
	}
	f.mu.Lock()
	f.passEndedLocked()
	pending := f.passEnd
	f.mu.Unlock()
	for range 2 {
		select {
		case stayed := <-released:
			if !stayed {
				t.Fatal("a client released by the pass's end was turned away")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the pass's end did not release every waiting client")
		}
	}
	if pending != nil {
		t.Fatal("the pass's end left its channel for the next pass")
	}
}

// A client whose place in the stream was evicted while it waited for a
// pass (a burst larger than the history) starts at the oldest entry kept,
// and is let catch up from there: it has had no byte, so it has lost
// nothing it was sent, and is not a client that fell behind.
func TestStartAfterArrivalEvicted(t *testing.T) {
	s := testStream(8, 1<<20)
	defer s.hub.Destruct()
	arrived := s.position()
	for i := range 20 {
		pub(s, fmt.Sprint(i), true, fmt.Sprintf("<%d>", i))
	}
	c := &client{h: &Handler{}, s: s}
	c.start(lastID{}, arrived)
	if c.cursor != 12 || c.arrived != arrived {
		t.Fatalf("cursor %d, arrived %d after the place it arrived at (%d) was evicted; want the cursor at the oldest entry kept (12), arrival unchanged", c.cursor, c.arrived, arrived)
	}
	out, _, next, _, behind := collectAt(s, c.cursor, new(*[]byte), false)
	if string(out) != "<12><13><14><15><16><17><18><19>" || next != 20 || behind == lagEvicted {
		t.Fatalf("from where it starts: %q up to %d, behind %v", out, next, behind)
	}
	// one whose place is still held starts there, as without the wait
	c = &client{h: &Handler{}, s: s}
	c.start(lastID{}, 15)
	if c.cursor != 15 || c.arrived != 15 {
		t.Fatalf("cursor %d, arrived %d for a place still held; want 15", c.cursor, c.arrived)
	}
}

// Through Caddy: a client joining while its stream's writer is in a pass
// gets no byte until that pass ends, then gets what was published since
// it arrived, as without the wait; one that hangs up while waiting gets no
// head and leaves its stream.
func TestJoiningClientWaitsForThePassUnderway(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n keepalive off\n linger off\n}")
	a, aResp := rawStream(t, base, "/j", 0)
	o.waitOpen(t, "/j", 1, 5*time.Second)
	var gotA strings.Builder
	o.send("/j", ev(1, "e1"))
	readUntil(t, a, aResp.Body, &gotA, ev(1, "e1"), 5*time.Second)
	s := findStream(t, "/j")
	f := s.fan
	// joiners are told a pass is underway once the writer is idle: with
	// keepalive off, only a publish wakes it then. A pass still under way
	// (a's take-over, e1) clears the flag: set it again until it holds.
	var setAt time.Time
	eventually(t, 5*time.Second, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		if !f.inPass {
			f.inPass, setAt = true, time.Now()
			return false
		}
		return time.Since(setAt) > 200*time.Millisecond
	}, func() string { return "the writer did not go idle" })

	gone := dialStream(t, base, "/j", 0)
	b := dialStream(t, base, "/j", 0)
	eventually(t, 5*time.Second, func() bool { return s.clientCount() == 3 }, func() string {
		return fmt.Sprintf("%d clients attached, want 3", s.clientCount())
	})
	for _, c := range []net.Conn{gone, b} {
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("a client joining during a pass got its head before the pass ended: %d bytes, %v", n, err)
		}
		_ = c.SetReadDeadline(time.Time{})
	}
	f.mu.Lock()
	waiting := f.inPass && f.passEnd != nil
	f.mu.Unlock()
	if !waiting {
		t.Fatal("the joining clients are not waiting for the pass")
	}
	gone.Close()
	eventually(t, 5*time.Second, func() bool { return s.clientCount() == 2 }, func() string {
		return fmt.Sprintf("%d clients attached after one hung up while waiting, want 2", s.clientCount())
	})
	if d := direct(); d != 1 {
		t.Fatalf("%v direct clients after one hung up while waiting, want 1 (it must not be taken over)", d)
	}

	o.send("/j", ev(2, "e2")) // its pass ends the wait
	readUntil(t, a, aResp.Body, &gotA, ev(2, "e2"), 5*time.Second)
	_ = b.SetReadDeadline(time.Now().Add(10 * time.Second))
	bResp, err := http.ReadResponse(bufio.NewReader(b), nil)
	if err != nil {
		t.Fatalf("the waiting client's head after the pass: %v", err)
	}
	o.send("/j", ev(3, "e3"))
	var gotB strings.Builder
	readUntil(t, b, bResp.Body, &gotB, ev(3, "e3"), 5*time.Second)
	if want := ev(2, "e2") + ev(3, "e3"); gotB.String() != want {
		t.Fatalf("the client that waited got %q, want %q: what was published since it arrived", gotB.String(), want)
	}
}
