package ssefanout

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Tests for the issue "Bounded under abuse": hostile or careless clients
// and origins cost bounded memory, connections and goroutines, and never
// take the proxy or the other streams down. Like fanout_test.go they run a
// real Caddy from a Caddyfile, a real loopback origin and real sockets.

// abuseTransportFrom returns a client transport whose connections leave
// from the loopback address ip, so that many short connections spread
// over several source addresses instead of exhausting one's ports.
func abuseTransportFrom(ip string) *http.Transport {
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	return &http.Transport{
		DialContext:         d.DialContext,
		DisableCompression:  true,
		DisableKeepAlives:   true,
		MaxIdleConnsPerHost: -1,
	}
}

// abuseRecorder drains an origin's recorded requests so that a test can
// look them up by path at any time.
type abuseRecorder struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func recordRequests(t *testing.T, o *origin) *abuseRecorder {
	rec := &abuseRecorder{}
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
func (rec *abuseRecorder) byPath(path string) []*http.Request {
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

func TestAbuseClientChurn(t *testing.T) {
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
		trs[i] = abuseTransportFrom(ip)
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

func TestAbuseLongLastEventID(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	rec := recordRequests(t, o)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n}")

	atLimit := strings.Repeat("A", maxLastEventIDLen) // 1 KiB: honoured
	over := strings.Repeat("B", maxLastEventIDLen+1)  // longer: treated as absent
	a := connect(t, base+"/l", nil)
	o.waitOpen(t, "/l", 1, 5*time.Second)
	evAt := "id: " + atLimit + "\ndata: at-limit\n\n"
	evOver := "id: " + over + "\ndata: over-limit\n\n"
	o.send("/l", ev(1, "m1")+evAt+evOver+ev(4, "m4"))
	a.waitFor(t, ev(4, "m4"), 5*time.Second)
	if got, want := a.events(), ev(1, "m1")+evAt+evOver+ev(4, "m4"); got != want {
		t.Fatalf("first client got %q, want %q", truncate(got, 300), truncate(want, 300))
	}

	// control: an id of exactly 1 KiB resumes from the history
	ctl := connect(t, base+"/l", http.Header{"Last-Event-Id": {atLimit}})
	ctl.waitFor(t, evOver+ev(4, "m4"), 5*time.Second)

	// longer than 1 KiB: treated as absent, even though it is in the
	// history; the client starts live with the committed id
	long := connect(t, base+"/l", http.Header{"Last-Event-Id": {over}})
	longQ := connect(t, base+"/l?lastEventId="+over, nil)
	unknown := connect(t, base+"/l", http.Header{"Last-Event-Id": {strings.Repeat("z", 4096)}})
	for _, c := range []*sseClient{long, longQ, unknown} {
		c.waitFor(t, "id: 4\n\n", 5*time.Second)
	}
	o.send("/l", ev(5, "m5"))
	for i, c := range []*sseClient{long, longQ, unknown} {
		c.waitFor(t, ev(5, "m5"), 5*time.Second)
		if got, want := c.events(), "id: 4\n\n"+ev(5, "m5"); got != want {
			t.Fatalf("client %d with a Last-Event-ID over 1KiB got %q, want %q (live start, no history)", i, truncate(got, 300), want)
		}
	}
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections, want 1", got)
	}

	// a cold stream created with an over-long id does not pass it upstream
	cold := connect(t, base+"/cold", http.Header{"Last-Event-Id": {over}})
	o.waitOpen(t, "/cold", 1, 5*time.Second)
	eventually(t, 5*time.Second, func() bool { return len(rec.byPath("/cold")) == 1 }, func() string { return "no request for /cold recorded" })
	if got := rec.byPath("/cold")[0].Header.Values("Last-Event-Id"); len(got) != 0 {
		t.Fatalf("an over-long Last-Event-ID reached the origin (%d values, first %d bytes)", len(got), len(got[0]))
	}
	o.send("/cold", "data: cold\n\n")
	cold.waitFor(t, "data: cold\n\n", 5*time.Second)
	if got := cold.events(); got != "data: cold\n\n" {
		t.Fatalf("cold client got %q, want a plain event with no inherited id", truncate(got, 300))
	}
}

func TestAbuseManyQueryStrings(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n max_streams 50\n linger 1m\n keepalive 1m\n}")

	tr := &http.Transport{
		DisableCompression:  true,
		MaxIdleConnsPerHost: 16,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}
	defer tr.CloseIdleConnections()

	var maxOpen atomic.Int64
	sampleStop := make(chan struct{})
	sampleDone := make(chan struct{})
	go func() {
		defer close(sampleDone)
		for {
			if v := int64(o.openTotal()); v > maxOpen.Load() {
				maxOpen.Store(v)
			}
			select {
			case <-sampleStop:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()

	const total, workers = 10000, 4
	start := time.Now()
	jobs := make(chan int)
	var accepted, refusedES, refused503 atomic.Int64
	var failed atomic.Int64
	var firstErr atomic.Pointer[string]
	fail := func(msg string) {
		failed.Add(1)
		firstErr.CompareAndSwap(nil, &msg)
	}
	var heldMu sync.Mutex
	var held []func()
	defer func() {
		for _, release := range held {
			release()
		}
	}()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range jobs {
				// every tenth request is not an EventSource's
				accept := i%10 != 9
				resp, cancel, err := getWithin(tr, fmt.Sprintf("%s/q?n=%d", base, i), accept, time.Minute)
				if err != nil {
					fail(fmt.Sprintf("request %d: %v", i, err))
					continue
				}
				switch {
				case resp.Header.Get("X-Origin") == "yes":
					// accepted: a live stream, held to the end, so that
					// its stream keeps its slot (a stream whose clients
					// all left would make room for a new one)
					accepted.Add(1)
					if resp.StatusCode != 200 {
						fail(fmt.Sprintf("request %d accepted with status %d", i, resp.StatusCode))
					}
					heldMu.Lock()
					held = append(held, func() { cancel(); resp.Body.Close() })
					heldMu.Unlock()
					continue
				case accept:
					refusedES.Add(1)
					if err := checkRefusal(resp); err != nil {
						fail(fmt.Sprintf("request %d: %v", i, err))
					}
				default:
					refused503.Add(1)
					if err := check503(resp); err != nil {
						fail(fmt.Sprintf("request %d: %v", i, err))
					}
				}
				cancel()
			}
		})
	}
	for i := range total {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	close(sampleStop)
	<-sampleDone
	t.Logf("%d requests with distinct queries in %v: %d accepted, %d refused with retry:, %d refused with 503; origin: %d connections, at most %d open at once",
		total, time.Since(start).Round(time.Millisecond), accepted.Load(), refusedES.Load(), refused503.Load(), o.total.Load(), maxOpen.Load())
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d requests failed, first: %s", n, *firstErr.Load())
	}
	if got := maxOpen.Load(); got > 50 {
		t.Fatalf("origin had %d connections open at once, want at most max_streams (50)", got)
	}
	if got := o.total.Load(); got > 50 {
		t.Fatalf("origin saw %d connections in all, want at most 50 (no stream with clients closes)", got)
	}
	if got := accepted.Load(); got != 50 {
		t.Fatalf("%d requests were accepted, want exactly max_streams (50)", got)
	}
	if refusedES.Load() == 0 || refused503.Load() == 0 {
		t.Fatalf("both kinds of refusal should have been seen")
	}
	// a request for an existing stream is still served
	c := connect(t, base+"/q?n=0", nil)
	if c.resp.Header.Get("X-Origin") != "yes" {
		t.Fatalf("a client of an existing stream was refused at max_streams: %v", c.resp.Header)
	}
}

func TestAbuseMaxClients(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n max_clients 3\n linger 100ms\n keepalive 1m\n}")

	var cs []*sseClient
	for range 3 {
		cs = append(cs, connect(t, base+"/m", nil))
	}
	o.waitOpen(t, "/m", 1, 5*time.Second)
	o.send("/m", ev(1, "one"))

	resp, cancel, err := getWithin(sharedTransport, base+"/m", true, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkRefusal(resp); err != nil {
		t.Fatalf("4th EventSource client: %v", err)
	}
	cancel()
	resp, cancel, err = getWithin(sharedTransport, base+"/m", false, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := check503(resp); err != nil {
		t.Fatalf("4th plain client: %v", err)
	}
	cancel()

	o.send("/m", ev(2, "two"))
	for i, c := range cs {
		c.waitFor(t, ev(2, "two"), 5*time.Second)
		if got := c.events(); got != ev(1, "one")+ev(2, "two") || c.ended() {
			t.Fatalf("existing client %d: got %q (ended %v)", i, got, c.ended())
		}
	}
	// a freed place is taken again
	s := findStream(t, "/m")
	cs[0].close()
	eventually(t, 5*time.Second, func() bool { return clientCount(s) == 2 }, func() string { return "client did not detach" })
	again := connect(t, base+"/m", nil)
	if again.resp.Header.Get("X-Origin") != "yes" {
		t.Fatalf("client refused after a place was freed: %v", again.resp.Header)
	}
	again.waitFor(t, "id: 2\n\n", 5*time.Second)
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections, want 1", got)
	}
}

func TestAbusePathEscape(t *testing.T) {
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

func TestAbuseOversizedEvent(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	var bigConns atomic.Int64
	halfway := make(chan struct{})
	resume := make(chan struct{})
	var resumeOnce sync.Once
	t.Cleanup(func() { resumeOnce.Do(func() { close(resume) }) })
	var wrote atomic.Int64
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("X-Origin", "yes")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		_ = rc.Flush()
		switch r.URL.Path {
		case "/big":
			if bigConns.Add(1) != 1 {
				<-r.Context().Done()
				return
			}
			chunk := bytes.Repeat([]byte("x"), 1<<20)
			if _, err := io.WriteString(w, "data: "); err != nil {
				return
			}
			for i := range 200 {
				if i == 100 {
					close(halfway)
					select {
					case <-resume:
					case <-r.Context().Done():
						return
					}
				}
				if _, err := w.Write(chunk); err != nil {
					return
				}
				wrote.Add(int64(len(chunk)))
			}
			_, _ = io.WriteString(w, "\n\n")
			_, _ = io.WriteString(w, "id: 1\ndata: after\n\n")
			// an oversized event with an id still commits its id
			_, _ = io.WriteString(w, "id: 2\ndata: ")
			_, _ = w.Write(chunk)
			_, _ = w.Write(chunk)
			_, _ = io.WriteString(w, "\n\nid: 3\ndata: last\n\n")
			_ = rc.Flush()
			<-r.Context().Done()
		case "/other":
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for i := 1; ; i++ {
				select {
				case <-tick.C:
					if _, err := fmt.Fprintf(w, "id: %d\ndata: tick\n\n", i); err != nil {
						return
					}
					_ = rc.Flush()
				case <-r.Context().Done():
					return
				}
			}
		default:
			http.NotFound(w, r)
		}
	})
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n max_event_size 1MiB\n linger 100ms\n keepalive 1s\n}")

	other := connect(t, base+"/other", nil)
	other.waitFor(t, "data: tick\n\n", 5*time.Second)

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	big := connect(t, base+"/big", nil)
	select {
	case <-halfway:
	case <-time.After(60 * time.Second):
		t.Fatalf("the origin could not write 100 MiB of the event within 60s (wrote %d MiB)", wrote.Load()>>20)
	}
	// with 100 MiB of one event read, the other stream still flows
	n := strings.Count(other.events(), "data: tick\n")
	eventually(t, 10*time.Second, func() bool { return strings.Count(other.events(), "data: tick\n") >= n+2 }, func() string {
		return "the other stream stopped while the oversized event was being read"
	})
	resumeOnce.Do(func() { close(resume) })
	big.waitFor(t, "id: 3\ndata: last\n\n", 60*time.Second)
	elapsed := time.Since(start)
	var after runtime.MemStats
	runtime.ReadMemStats(&after)

	if got, want := big.events(), "id: 1\ndata: after\n\nid: 2\n\nid: 3\ndata: last\n\n"; got != want {
		t.Fatalf("client of the oversized stream got %q, want %q (the events after it, and the skipped event's id)", truncate(got, 300), want)
	}
	if big.ended() {
		t.Fatalf("client of the oversized stream was disconnected")
	}
	if got := bigConns.Load(); got != 1 {
		t.Fatalf("origin saw %d connections for the oversized stream, want 1 (the connection stays up)", got)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("200 MiB event (and a 2 MiB one) skipped in %v; TotalAlloc grew by %.1f MiB meanwhile", elapsed.Round(time.Millisecond), float64(alloc)/(1<<20))
	if alloc >= 100<<20 {
		t.Fatalf("allocated %d MiB while skipping a 200 MiB event, want < 100 MiB", alloc>>20)
	}
	if other.ended() {
		t.Fatalf("the other stream ended")
	}
}

func TestAbuseSilentOrigin(t *testing.T) {
	leakCheck(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	accepted := make(chan time.Time, 100)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			select {
			case accepted <- time.Now():
			default:
			}
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	base := startCaddy(t, "sse_fanout http://"+ln.Addr().String()+" {\n status_wait 1s\n keepalive 300ms\n linger 100ms\n transport http {\n  response_header_timeout 2s\n }\n}")

	start := time.Now()
	c := connect(t, base+"/silent", nil)
	head := time.Since(start)
	t.Logf("first client got its head after %v", head.Round(time.Millisecond))
	if c.resp.StatusCode != 200 || c.resp.Header.Get("Content-Type") != "text/event-stream" ||
		c.resp.Header.Get("Cache-Control") != "no-cache, no-transform" {
		t.Fatalf("first client: %d %v, want a 200 event stream", c.resp.StatusCode, c.resp.Header)
	}
	if head > 5*time.Second {
		t.Fatalf("first client waited %v for its head, want about status_wait (1s)", head)
	}
	var first time.Time
	select {
	case first = <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy never connected to the origin")
	}
	eventually(t, 5*time.Second, func() bool { return strings.Count(c.bytes(), ": keepalive\n") >= 3 }, func() string {
		return fmt.Sprintf("want 3 keepalives, got %q", c.bytes())
	})
	select {
	case second := <-accepted:
		t.Logf("second upstream attempt %v after the first", second.Sub(first).Round(time.Millisecond))
	case <-time.After(20 * time.Second):
		t.Fatal("no new upstream attempt within 20s of an origin that never answered (response_header_timeout 2s)")
	}
	// a client that arrives while the stream is retrying gets its head too
	late := connect(t, base+"/silent", nil)
	if late.resp.StatusCode != 200 || late.resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("late client: %d %v", late.resp.StatusCode, late.resp.Header)
	}
	if c.ended() || strings.Contains(c.bytes(), "504") {
		t.Fatalf("first client's stream ended or carried an error: %q", c.bytes())
	}
	if got := stripComments(c.bytes()); got != "" {
		t.Fatalf("first client got %q, want only keepalive comments", got)
	}
}

func TestAbuseUpstreamIdleTimeout(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	prelude := "retry: 200\n\n"
	o.prelude.Store(&prelude)
	rec := recordRequests(t, o)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n upstream_idle_timeout 1s\n linger 100ms\n keepalive 1m\n}")

	// an origin that sends comments every 300ms stays connected
	pinged := connect(t, base+"/pinged", nil)
	o.waitOpen(t, "/pinged", 1, 5*time.Second)
	pingStart := time.Now()
	stopPing := make(chan struct{})
	pingDone := make(chan struct{})
	go func() {
		defer close(pingDone)
		for {
			select {
			case <-stopPing:
				return
			case <-time.After(300 * time.Millisecond):
				o.send("/pinged", ": ping\n")
			}
		}
	}()
	defer func() { close(stopPing); <-pingDone }()

	// an origin that sends one event and goes silent is resumed
	c := connect(t, base+"/idle", nil)
	o.waitOpen(t, "/idle", 1, 5*time.Second)
	sent := time.Now()
	o.send("/idle", ev(1, "one"))
	c.waitFor(t, ev(1, "one"), 5*time.Second)
	eventually(t, 10*time.Second, func() bool { return len(rec.byPath("/idle")) >= 2 }, func() string {
		return "no reconnect within 10s of a silent upstream with upstream_idle_timeout 1s"
	})
	gap := time.Since(sent)
	t.Logf("silent upstream resumed %v after its last event", gap.Round(time.Millisecond))
	if gap < 900*time.Millisecond {
		t.Fatalf("upstream reconnected %v after its last event, before upstream_idle_timeout (1s)", gap)
	}
	if got := rec.byPath("/idle")[1].Header.Get("Last-Event-Id"); got != "1" {
		t.Fatalf("reconnect Last-Event-ID %q, want 1", got)
	}
	o.waitOpen(t, "/idle", 1, 5*time.Second)
	o.send("/idle", ev(2, "two"))
	c.waitFor(t, ev(2, "two"), 5*time.Second)

	if d := 3500*time.Millisecond - time.Since(pingStart); d > 0 {
		time.Sleep(d)
	}
	if got := len(rec.byPath("/pinged")); got != 1 {
		t.Fatalf("an upstream sending comments every 300ms was reconnected: %d requests in %v", got, time.Since(pingStart).Round(time.Millisecond))
	}
	if got := o.open("/pinged"); got != 1 || pinged.ended() {
		t.Fatalf("pinged stream: %d open upstreams, client ended %v", got, pinged.ended())
	}
}

func TestAbuseGarbageOrigin(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n keepalive 1m\n}")

	c := connect(t, base+"/g", nil)
	o.waitOpen(t, "/g", 1, 5*time.Second)
	// invalid UTF-8 and NUL inside data lines, a truncated sequence at a
	// line's end
	o.send("/g", "data: a\xffb\x00c\ndata: \xe2\x82\n\n")
	// lone CRs as line ends
	o.send("/g", "data: cr1\rdata: cr2\r\r")
	// NUL alone on a line, garbage field names
	o.send("/g", "\x00\n\xff\xfe: x\n\n")
	// a 10 MiB comment line
	o.send("/g", ":"+strings.Repeat("c", 10<<20)+"\n")
	// an id with NUL is ignored; an invalid type is replaced
	o.send("/g", "id: bad\x00id\ndata: afterbad\n\n")
	o.send("/g", "id: 8\ndata: normal\n\n")
	o.send("/g", "event: t\xff\ndata: typed\n\n")

	want := "data: a\uFFFDb\x00c\ndata: \uFFFD\n\n" +
		"data: cr1\ndata: cr2\n\n" +
		"data: afterbad\n\n" +
		"id: 8\ndata: normal\n\n" +
		"id: 8\nevent: t\uFFFD\ndata: typed\n\n"
	c.waitFor(t, "data: typed\n\n", 10*time.Second)
	if got := c.events(); got != want {
		t.Fatalf("client got\n%q\nwant\n%q", truncate(got, 500), want)
	}
	// the process and the stream are alive
	o.send("/g", ev(9, "still"))
	c.waitFor(t, want+ev(9, "still"), 5*time.Second)
	late := connect(t, base+"/g", http.Header{"Last-Event-Id": {"8"}})
	late.waitFor(t, "id: 8\nevent: t\uFFFD\ndata: typed\n\n"+ev(9, "still"), 5*time.Second)
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections, want 1", got)
	}
}

func TestAbuseFlappingOrigin(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	var mu sync.Mutex
	var flaps []time.Time
	type legitConn struct {
		at     time.Time
		lastID string
	}
	var legit []legitConn
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		switch r.URL.Path {
		case "/flap":
			mu.Lock()
			flaps = append(flaps, time.Now())
			mu.Unlock()
			w.WriteHeader(http.StatusOK)
		case "/legit":
			mu.Lock()
			legit = append(legit, legitConn{time.Now(), r.Header.Get("Last-Event-Id")})
			n := len(legit)
			mu.Unlock()
			w.WriteHeader(http.StatusOK)
			fmt.Fprintf(w, "retry: 300\nid: %d\ndata: x\n\n", n)
		default:
			http.NotFound(w, r)
		}
	})
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n keepalive 1m\n}")

	start := time.Now()
	flapper := connect(t, base+"/flap", nil)
	lc := connect(t, base+"/legit", nil)
	if flapper.resp.StatusCode != 200 || lc.resp.StatusCode != 200 {
		t.Fatalf("status %d and %d, want 200", flapper.resp.StatusCode, lc.resp.StatusCode)
	}
	eventually(t, 5*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(legit) >= 3
	}, func() string {
		mu.Lock()
		defer mu.Unlock()
		return fmt.Sprintf("a legitimate origin (retry: 300, one event, close) was reconnected %d times in 5s, want at least 3", len(legit))
	})
	lc.waitFor(t, "retry: 300\nid: 3\ndata: x\n\n", 5*time.Second)

	if d := 10*time.Second - time.Since(start); d > 0 {
		time.Sleep(d)
	}
	mu.Lock()
	nflaps := len(flaps)
	ls := slices.Clone(legit)
	mu.Unlock()
	t.Logf("in %v: %d connections of an origin that closes at once without an event, %d of one that sends retry: 300 and an event",
		time.Since(start).Round(time.Millisecond), nflaps, len(ls))
	if nflaps >= 10 {
		t.Fatalf("a flapping origin was reconnected %d times in 10s, want < 10 (backoff 1s, 2s, 4s, 8s)", nflaps)
	}
	if nflaps < 2 {
		t.Fatalf("a flapping origin was tried %d times in 10s, want it retried", nflaps)
	}
	for i := 1; i < len(ls); i++ {
		if want := strconv.Itoa(i); ls[i].lastID != want {
			t.Fatalf("legit connection %d carried Last-Event-ID %q, want %q", i+1, ls[i].lastID, want)
		}
		if gap := ls[i].at.Sub(ls[i-1].at); gap < 250*time.Millisecond {
			t.Fatalf("legit connection %d came %v after the previous, before its retry (300ms -10%%)", i+1, gap)
		}
	}
	if ls[0].lastID != "" {
		t.Fatalf("first connection carried Last-Event-ID %q", ls[0].lastID)
	}
	if flapper.ended() || lc.ended() {
		t.Fatalf("a client's stream ended (flap %v, legit %v)", flapper.ended(), lc.ended())
	}
}

// TestAbuseLaggingClientResumes: an origin publishes faster than one client
// reads. The fast clients get everything; the slow one is dropped once it
// is more than 3/4 of the history behind, and resumes by Last-Event-ID
// with no gap and no duplicate.
func TestAbuseLaggingClientResumes(t *testing.T) {
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
