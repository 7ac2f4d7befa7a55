package ssefanout

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Hostile and careless clients: churn, path tricks, readers too slow for
// the stream. None costs unbounded memory or touches another client.
// Through a real Caddy, a real loopback origin and real sockets.

// churnCycle connects, waits for one whole event, and disconnects.
func churnCycle(rt http.RoundTripper, url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Origin") != "yes" {
		return fmt.Errorf("status %d, headers %v", resp.StatusCode, resp.Header)
	}
	var got []byte
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		got = append(got, buf[:n]...)
		if i := bytes.Index(got, []byte("data: ")); i >= 0 && bytes.Contains(got[i:], []byte("\n\n")) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("no event before %v; got %q", err, got)
		}
	}
}

func TestClientChurn(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	prelude := "id: 0\ndata: hello\n\n"
	o.prelude.Store(&prelude)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n replay 1\n linger 100ms\n keepalive 1m\n}")

	const (
		clients     = 2000
		cycles      = 5
		concurrency = 500
		paths       = 4
	)
	srcs := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"}
	trs := make([]*http.Transport, len(srcs))
	for i, ip := range srcs {
		trs[i] = transportFrom(ip)
	}
	defer func() {
		for _, tr := range trs {
			tr.CloseIdleConnections()
		}
	}()

	baseline := heapInuse()

	// the origin keeps publishing on every open stream meanwhile
	stopPub := make(chan struct{})
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := 1; ; i++ {
			select {
			case <-tick.C:
				for p := range paths {
					o.send(fmt.Sprintf("/churn/%d", p), ev(i, "tick"))
				}
			case <-stopPub:
				return
			}
		}
	}()

	start := time.Now()
	jobs := make(chan int)
	var failed atomic.Int64
	var firstErr atomic.Pointer[string]
	var peak atomic.Int64
	var wg sync.WaitGroup
	for range concurrency {
		wg.Go(func() {
			for k := range jobs {
				client := k % clients
				url := fmt.Sprintf("%s/churn/%d", base, client%paths)
				if err := churnCycle(trs[client%len(trs)], url); err != nil {
					failed.Add(1)
					msg := fmt.Sprintf("client %d cycle %d: %v", client, k/clients, err)
					firstErr.CompareAndSwap(nil, &msg)
				}
			}
		})
	}
	// sample the heap while the clients come and go
	sampleStop := make(chan struct{})
	sampleDone := make(chan struct{})
	go func() {
		defer close(sampleDone)
		var ms runtime.MemStats
		for {
			select {
			case <-sampleStop:
				return
			case <-time.After(500 * time.Millisecond):
			}
			runtime.ReadMemStats(&ms)
			if v := int64(ms.HeapInuse); v > peak.Load() {
				peak.Store(v)
			}
		}
	}()
	for k := range clients * cycles {
		jobs <- k
	}
	close(jobs)
	wg.Wait()
	close(sampleStop)
	<-sampleDone
	close(stopPub)
	<-pubDone
	elapsed := time.Since(start)
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d cycles failed, first: %s", n, clients*cycles, *firstErr.Load())
	}
	t.Logf("%d connect/receive/close cycles (%d clients x %d) in %v", clients*cycles, clients, cycles, elapsed.Round(time.Millisecond))

	for _, tr := range trs {
		tr.CloseIdleConnections()
	}
	sharedTransport.CloseIdleConnections()
	checkNoLeaks(t)
	eventually(t, 10*time.Second, func() bool {
		n := 0
		hubs.Range(func(_, v any) bool { n += v.(*hub).streamCount(); return true })
		return n == 0
	}, func() string { return "streams left in the hubs after every client left and linger ran out" })
	eventually(t, 10*time.Second, func() bool { return o.openTotal() == 0 }, func() string {
		return fmt.Sprintf("origin still has %d streams open", o.openTotal())
	})
	after := heapInuse()
	const mib = 1 << 20
	t.Logf("HeapInuse: baseline %.1f MiB (Caddy started, no client), peak sampled %.1f MiB, after churn %.1f MiB; origin connections %d",
		float64(baseline)/mib, float64(peak.Load())/mib, float64(after)/mib, o.total.Load())
	if limit := 2*baseline + 16*mib; after > limit {
		t.Fatalf("HeapInuse after churn %d bytes, over 2x baseline (%d) + 16MiB", after, baseline)
	}
}

func TestPathEscape(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	originHost := strings.TrimPrefix(o.URL, "http://")
	base := startCaddy(t, "sse_fanout "+o.URL+"/base {\n linger 100ms\n keepalive 1m\n}")
	addr := strings.TrimPrefix(base, "http://")

	cases := []struct {
		target  string
		mustBad bool // decodes to dot-segments (with / or \ as separator): must be refused with 400
	}{
		{"//evil.example/x", false},
		{"/%2e%2e/secret", true},
		{"/..%2fsecret", true},
		{"/a/%2E%2E/%2E%2E/x", true},
		{"/%2e%2e%2f%2e%2e%2fsecret", true},
		{"/a/%2e/b", true},
		{"http://evil.example/x", false},
		{"http://" + addr + "/%2e%2e/secret", true},
		{"http://" + addr + "/abs", false},
		{`/a\..\x`, true},
		{`/a%5c..%5cx`, true},
		{`/a%5C%2e%2e%5Cx`, true},
		{"*", false}, // asterisk-form: a path that does not start with /
	}
	for _, tc := range cases {
		// drop what earlier cases left
		for len(o.requests) > 0 {
			<-o.requests
		}
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", tc.target, addr)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			conn.Close()
			t.Fatalf("%s: reading the response: %v", tc.target, err)
		}
		stream := resp.StatusCode == 200 && resp.Header.Get("Content-Type") == "text/event-stream"
		var up *http.Request
		if stream {
			select {
			case up = <-o.requests:
			case <-time.After(5 * time.Second):
			}
		} else {
			time.Sleep(200 * time.Millisecond)
			select {
			case up = <-o.requests:
			default:
			}
		}
		conn.Close()
		t.Logf("%-40q -> %d %s", tc.target, resp.StatusCode, func() string {
			if up == nil {
				return "(origin not asked)"
			}
			return "origin asked for Host " + up.Host + " " + up.RequestURI
		}())
		if tc.mustBad && resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400 (the path decodes to dot-segments)", tc.target, resp.StatusCode)
		}
		if resp.StatusCode == http.StatusBadRequest {
			if up != nil {
				t.Errorf("%s: refused with 400, but the origin was asked for %s", tc.target, up.RequestURI)
			}
			continue
		}
		if up == nil {
			if stream {
				t.Errorf("%s: served as a stream (%d) but the origin recorded no request", tc.target, resp.StatusCode)
			}
			// not routed to sse_fanout at all (e.g. another Host): the
			// origin was never asked, so nothing left the base
			continue
		}
		if up.Host != originHost {
			t.Errorf("%s: origin request Host %q, want %q", tc.target, up.Host, originHost)
		}
		decoded := up.URL.Path
		if raw, err := url.PathUnescape(up.URL.EscapedPath()); err == nil && raw != decoded {
			t.Errorf("%s: origin path %q decodes differently from the raw %q", tc.target, decoded, up.URL.EscapedPath())
		}
		if decoded != "/base" && !strings.HasPrefix(decoded, "/base/") {
			t.Errorf("%s: origin path %q left the base /base", tc.target, decoded)
		}
		for _, seg := range strings.FieldsFunc(decoded, func(r rune) bool { return r == '/' || r == '\\' }) {
			if seg == "." || seg == ".." {
				t.Errorf("%s: origin path %q has a dot-segment", tc.target, decoded)
			}
		}
	}
}

// TestLaggingClientResumes: an origin publishes faster than one client
// reads. The fast clients get everything; the slow one is dropped once it
// is more than 3/4 of the history behind, and resumes by Last-Event-ID
// with no gap and no duplicate.
func TestLaggingClientResumes(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	// the quarter of the history left when a client is dropped must cover
	// what the kernel still holds for it (a socket send buffer grows to
	// 4 MiB on Linux) and what is published during its last blocked write:
	// 8000 events of 4 KiB leave 8 MiB
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n history 8000\n history_bytes 64MiB\n linger 5s\n keepalive 1m\n}")
	// the slow client reads 4 KiB every 5 ms on a normal socket: what the
	// kernel buffers for it is bounded by the proxy's client_send_buffer
	// (256 KiB) plus its own receive buffer
	slowRT := newClientTransport()
	defer slowRT.CloseIdleConnections()
	fastRT := newClientTransport()
	defer fastRT.CloseIdleConnections()

	slow := newEventSource(t, slowRT, base+"/lag")
	slow.readDelay.Store(int64(5 * time.Millisecond))
	var fast []*eventSource
	for range 5 {
		fast = append(fast, newEventSource(t, fastRT, base+"/lag"))
	}
	o.waitOpen(t, "/lag", 1, 5*time.Second)
	s := findStream(t, "/lag")
	eventually(t, 5*time.Second, func() bool { return clientCount(s) == 6 }, func() string { return "clients did not attach" })

	dropped := func() float64 { return testutil.ToFloat64(metrics.clientsDropped.WithLabelValues("lagging")) }
	before := dropped()
	payload := strings.Repeat("z", 4<<10)
	n := 0
	start := time.Now()
	// publish until the slow client is dropped, then stop at once so that
	// its resume point is still in the history
	for dropped() == before {
		if n >= 60000 || time.Since(start) > 90*time.Second {
			got, opens := slow.snapshot()
			t.Fatalf("slow client not dropped after %d events (it has %d events, %d connections; write timeouts %v)", n, len(got), opens, testutil.ToFloat64(metrics.clientsDropped.WithLabelValues("write_timeout")))
		}
		n++
		o.send("/lag", ev(n, fmt.Sprint(n, payload)))
		// at most ~1000 events/s: a blocked write to the slow client (one
		// batch, while it reads ~800 KB/s) must not outrun the margin
		time.Sleep(time.Millisecond)
	}
	t.Logf("slow client dropped as lagging after %d events of 4 KiB (%v)", n, time.Since(start).Round(time.Millisecond))
	slow.readDelay.Store(0)

	want := make([]string, 0, n)
	for i := 1; i <= n; i++ {
		want = append(want, fmt.Sprintf("%d|%d%s", i, i, payload))
	}
	for i, c := range append([]*eventSource{slow}, fast...) {
		eventually(t, 60*time.Second, func() bool { got, _ := c.snapshot(); return len(got) >= n }, func() string {
			got, _ := c.snapshot()
			c.mu.Lock()
			defer c.mu.Unlock()
			return fmt.Sprintf("client %d got %d of %d events; sent ids %q, statuses %v, clean ends %d, ends %d; stream clients %d", i, len(got), n, c.sentID, c.status, c.clean, len(c.ends), clientCount(s))
		})
		got, opens := c.snapshot()
		for j := range want {
			if j >= len(got) || got[j] != want[j] {
				t.Fatalf("client %d: event %d wrong or missing (got %d events, %d connections)", i, j+1, len(got), opens)
			}
		}
		if len(got) != n {
			t.Fatalf("client %d: %d events, want %d (duplicates)", i, len(got), n)
		}
		if i == 0 && opens < 2 {
			t.Fatalf("slow client was never reconnected (%d connections)", opens)
		}
	}
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections, want 1", got)
	}
}
