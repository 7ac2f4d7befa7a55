package ssefanout

import (
	"bufio"
	"context"
	"fmt"
	"hash/fnv"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	dto "github.com/prometheus/client_model/go"
)

// histCount returns how many observations a histogram holds.
func histCount(t testing.TB, h interface{ Write(*dto.Metric) error }) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// A stream closed while live (its last client left and the linger ran
// out) ends its upstream connection: the connection's duration is
// observed, as for one the origin ended.
func TestUpstreamDurationObservedWhenStreamCloses(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `sse_fanout /s/* `+o.URL+` {
		linger 50ms
	}`)
	before := histCount(t, metrics.upstreamUptime)
	c := connect(t, base+"/s/closing", nil)
	o.waitOpen(t, "/s/closing", 1, 5*time.Second)
	o.send("/s/closing", ev(1, "x"))
	c.waitFor(t, ev(1, "x"), 5*time.Second)
	c.close()
	o.waitOpen(t, "/s/closing", 0, 5*time.Second)
	eventually(t, 2*time.Second, func() bool { return histCount(t, metrics.upstreamUptime) == before+1 }, func() string {
		return "upstream_connection_duration_seconds was not observed when the stream closed"
	})
}

// The page is for this host's own clients: a client_ip of loopback is not
// enough when the connection came from another host (that proxy's
// loopback, or a forged X-Forwarded-For it passed on), nor when a trusted
// proxy forwarded for a remote address that Caddy's client_ip skipped
// (the left-most forged entry without trusted_proxies_strict, or every
// hop in a trusted range with it).
func TestStatusLoopbackNotForgedThroughProxies(t *testing.T) {
	req := func(remote, clientIP string, trusted bool, xff string) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "/status", nil)
		r.RemoteAddr = remote
		if xff != "" {
			r.Header.Set("X-Forwarded-For", xff)
		}
		vars := map[string]any{caddyhttp.ClientIPVarKey: clientIP, caddyhttp.TrustedProxyVarKey: trusted}
		return r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, vars))
	}
	for _, tc := range []struct {
		name string
		r    *http.Request
		want bool
	}{
		{"loopback", req("127.0.0.1:5000", "127.0.0.1", false, ""), true},
		{"IPv6 loopback", req("[::1]:5000", "::1", false, ""), true},
		{"IPv4-mapped loopback", req("[::ffff:127.0.0.1]:5000", "::ffff:127.0.0.1", false, ""), true},
		{"local proxy for a local client", req("127.0.0.1:5000", "127.0.0.1", true, "127.0.0.1"), true},
		{"remote proxy forwarding its own loopback", req("10.0.0.2:5000", "127.0.0.1", true, "127.0.0.1"), false},
		{"local proxy, forged left-most entry", req("127.0.0.1:5000", "127.0.0.1", true, "127.0.0.1, 203.0.113.9"), false},
		{"local proxy, a trusted LAN client (strict)", req("127.0.0.1:5000", "127.0.0.1", true, "10.1.2.3"), false},
		{"remote peer", req("203.0.113.9:5000", "203.0.113.9", false, ""), false},
		{"no client_ip, loopback peer", req("127.0.0.1:5000", "", false, ""), true},
		{"unix socket without trusted_proxies_unix", req("@", "", false, ""), false},
	} {
		if got := fromLoopback(tc.r); got != tc.want {
			t.Errorf("%s: fromLoopback = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Through a real Caddy: a trusted local proxy passes a client's forged
// X-Forwarded-For on (Caddy takes its left-most entry without
// trusted_proxies_strict), and with trusted_proxies_strict a client in a
// trusted range is reported as the proxy's own loopback address.
func TestStatusLoopbackForgedXFFThroughTrustedProxy(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	for _, tc := range []struct {
		name, global, forwardedFor string
	}{
		{"forged left-most entry", "trusted_proxies static 127.0.0.0/8", "127.0.0.1, 203.0.113.9"},
		{"LAN client, strict", "trusted_proxies static private_ranges\n\t\ttrusted_proxies_strict", "10.1.2.3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port := freePort(t)
			src := strings.Replace(caddyfileFor(port, statusSite(o.URL, "")), "grace_period 2s", "grace_period 2s\n\tservers {\n\t\t"+tc.global+"\n\t}", 1)
			loadCaddyfile(t, src)
			t.Cleanup(func() { _ = caddy.Stop() })
			base := fmt.Sprintf("http://127.0.0.1:%d", port)
			waitUp(t, base)
			_, resp := getStatus(t, base+"/status", http.Header{"X-Forwarded-For": {tc.forwardedFor}})
			if resp.StatusCode != http.StatusForbidden {
				t.Fatalf("a client forwarded as %q got %d, want 403", tc.forwardedFor, resp.StatusCode)
			}
		})
	}
}

// bytes_sent counts every event-stream byte written to clients after
// their heads: a late client's first write (the origin's retry and the
// committed id) and the id a client resuming live with a gap gets count as
// much as events. The stream's count equals what its clients read.
func TestBytesSentCountsPreludes(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `sse_fanout /s/* `+o.URL+` {
		keepalive 1m
		max_catch_ups off
	}`)
	const path = "/s/prelude"
	first := connect(t, base+path, nil)
	o.waitOpen(t, path, 1, 5*time.Second)
	o.send(path, "retry: 1500\n\n")
	o.send(path, ev(1, "x"))
	first.waitFor(t, ev(1, "x"), 5*time.Second)
	late := connect(t, base+path, nil)                                      // gets retry and id 1 first
	gap := connect(t, base+path, http.Header{"Last-Event-ID": {"unknown"}}) // live with a gap: gets id 1 first
	late.waitFor(t, "id: 1\n", 5*time.Second)
	gap.waitFor(t, "id: 1\n", 5*time.Second)
	o.send(path, ev(2, "y"))
	cs := []*sseClient{first, late, gap}
	for _, c := range cs {
		c.waitFor(t, ev(2, "y"), 5*time.Second)
	}
	s := findStream(t, path)
	var read uint64
	for _, c := range cs {
		read += uint64(len(c.bytes()))
	}
	eventually(t, 2*time.Second, func() bool { return s.stats.bytes.Load() == read }, func() string {
		return fmt.Sprintf("the stream counted %d bytes sent, its clients read %d (%q, %q, %q)",
			s.stats.bytes.Load(), read, first.bytes(), late.bytes(), gap.bytes())
	})
}

// The delivery lag measures how long the proxy takes to pass live events
// on, not how long a client was away: events a resuming client gets from
// the history (published before it came back) are not lag samples, as
// those of a catch-up are not.
func TestLagExcludesHistoryResumes(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `sse_fanout /s/* `+o.URL+` {
		keepalive 1m
	}`)
	const path = "/s/lag"
	const k = 2 * lagSampleEvery
	live := connect(t, base+path, nil)
	o.waitOpen(t, path, 1, 5*time.Second)
	for i := 1; i <= k; i++ {
		o.send(path, ev(i, "x"))
	}
	live.waitFor(t, ev(k, "x"), 5*time.Second)
	time.Sleep(time.Second) // the resuming client was away a second
	back := connect(t, base+path, http.Header{"Last-Event-ID": {"1"}})
	back.waitFor(t, ev(k, "x"), 5*time.Second)
	s := findStream(t, path)
	s.stats.lagMu.Lock()
	defer s.stats.lagMu.Unlock()
	if s.stats.lags == nil {
		t.Fatal("no lag sample")
	}
	for i, lag := range s.stats.lags[:min(s.stats.lagN, lagSamples)] {
		if lag >= 0.5 {
			t.Errorf("lag sample %d is %.3fs: the time the client was away, not a delivery lag", i, lag)
		}
	}
}

// A HEAD request for the page's stream gets the stream's head and ends,
// as the module's own streams do: it neither holds a viewer's place nor
// keeps its connection from answering the next request.
func TestStatusHeadStreamEnds(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))
	addr := strings.TrimPrefix(base, "http://")
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "HEAD /status HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", addr)
	br := bufio.NewReader(conn)
	head, err := rawLines(br)
	if err != nil || !strings.HasPrefix(head, "HTTP/1.1 200") || !strings.Contains(head, "text/event-stream") {
		t.Fatalf("HEAD answered %q: %v", head, err)
	}
	fmt.Fprintf(conn, "GET /status?format=json HTTP/1.1\r\nHost: %s\r\n\r\n", addr)
	next, err := rawLines(br)
	if err != nil || !strings.HasPrefix(next, "HTTP/1.1 200") {
		t.Fatalf("the request after the HEAD on the same connection got %q: %v", next, err)
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

// deadlineFlusher is a net/http response whose writes are buffered and
// whose flush fails on a passed write deadline, as TLS HTTP/1.1's does
// for an event smaller than its buffer.
type deadlineFlusher struct{ httptest.ResponseRecorder }

func (*deadlineFlusher) FlushError() error                { return os.ErrDeadlineExceeded }
func (*deadlineFlusher) SetWriteDeadline(time.Time) error { return nil }

// A client served through net/http whose flush runs out of write_timeout
// is dropped for write_timeout, and counted so, as one whose write did.
func TestWriteTimeoutOnFlushCounts(t *testing.T) {
	h := &Handler{WriteTimeout: caddy.Duration(time.Second), logger: zap.NewNop()}
	s := &stream{name: "x"}
	w := &deadlineFlusher{}
	c := &client{h: h, s: s, w: w, rc: http.NewResponseController(w)}
	err := c.write([]byte("data: x\n\n"))
	if writeEnd(err) != endWriteTimeout {
		t.Fatalf("write ended %q (%v), want %q", writeEnd(err), err, endWriteTimeout)
	}
	if n := s.stats.dropped[dropWriteTimeout].Load(); n != 1 {
		t.Fatalf("%d write_timeout drops counted, want 1", n)
	}
}

// A stream's name, on the status page, in the admin view and in the logs,
// does not let a viewer confirm a guess of its path, query or vary values
// (a tenant's name, a user id): it is not a public function of the key,
// such as the unkeyed FNV-1a the names were.
func TestStreamNameNotComputableFromAGuessedKey(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))
	connect(t, base+"/s/tenant-42", nil)
	s := findStream(t, "/base/tenant-42")
	rep := waitStatus(t, base+"/status", func(r statusReport) bool { return len(r.Shown) == 1 })
	guess := fnv.New64a()
	_, _ = guess.Write([]byte(s.key)) // the key as the code builds it from a guessed URL
	if shown := rep.Shown[0].Stream; shown == strconv.FormatUint(guess.Sum64(), 16) {
		t.Fatalf("the stream's name %s is the FNV-1a of its key: anyone can confirm a guessed tenant", shown)
	}
}

// logMsg is a log message as a follower's consumer delivers it.
type logMsg struct {
	jetstream.Msg
	hdr  nats.Header
	data []byte
}

func (m *logMsg) Headers() nats.Header { return m.hdr }
func (m *logMsg) Data() []byte         { return m.data }

// A node that opens a clustered stream loads the log's past, where the
// holder's reconnects are answers (live, retrying, live): replaying them
// ends no upstream connection now, and must not be observed as
// connections of no duration.
//
// Known defect, not fixed here (see the review report): run with
// SSEFANOUT_KNOWN_DEFECTS=1 to see it fail.
func TestClusterLoadObservesNoUpstreamDuration(t *testing.T) {
	if os.Getenv("SSEFANOUT_KNOWN_DEFECTS") == "" {
		t.Skip("known defect: a follower's log load observes the past's answers as upstream connections")
	}
	s := &stream{name: "x", ready: make(chan struct{})}
	c := &clusterSource{s: s, digest: "d", progress: make(chan struct{}, 1)}
	before := histCount(t, metrics.upstreamUptime)
	for i, st := range []streamState{stateLive, stateRetrying, stateLive, stateRetrying, stateLive} {
		a := answer{state: st}
		msg := &logMsg{hdr: nats.Header{hdrDigest: {"d"}}, data: appendRecord(nil, logRecord{answer: &a})}
		c.apply(msg, &jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: uint64(i + 1)}}, s, "", true)
	}
	if n := histCount(t, metrics.upstreamUptime) - before; n != 0 {
		t.Fatalf("loading the log's past observed %d upstream connection durations", n)
	}
	if s.stats.liveSince.Load() == 0 {
		t.Fatal("the stream is not live after the log's last answer (live)")
	}
}

// DNS rebinding: a web page of another site, once its name resolves to
// 127.0.0.1, reads a loopback-only page from the victim's own browser,
// which connects from loopback. On a site without a host (":8080"), any
// Host reaches the handler; the page should answer only Hosts that name
// this host (localhost, a loopback address), as Caddy's admin API does.
//
// Known defect, not fixed here (see the review report): run with
// SSEFANOUT_KNOWN_DEFECTS=1 to see it fail.
func TestStatusRefusesARebindingHost(t *testing.T) {
	if os.Getenv("SSEFANOUT_KNOWN_DEFECTS") == "" {
		t.Skip("known defect: the loopback-only page answers any Host (DNS rebinding)")
	}
	leakCheck(t)
	o := newOrigin(t)
	port := freePort(t)
	src := strings.Replace(caddyfileFor(port, statusSite(o.URL, "")), fmt.Sprintf("http://127.0.0.1:%d {", port), fmt.Sprintf("http://:%d {", port), 1)
	loadCaddyfile(t, src)
	t.Cleanup(func() { _ = caddy.Stop() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)
	req, _ := http.NewRequest(http.MethodGet, base+"/status?format=json", nil)
	req.Host = fmt.Sprintf("rebind.attacker.example:%d", port)
	resp, err := sharedTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Fatalf("a request for Host %s (a rebound name) got the report", req.Host)
	}
}
