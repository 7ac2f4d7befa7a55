package ssefanout

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// End-to-end tests: a real Caddy loaded from a Caddyfile, a real origin on
// loopback, real client sockets. They assert the raw bytes clients receive.

// ev is the wire form of an event as the origin sends it and as the proxy
// re-encodes it (same field order, one space after each colon).
func ev(id int, data string) string {
	return fmt.Sprintf("id: %d\ndata: %s\n\n", id, data)
}

func TestOneUpstreamForManyClients(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n keepalive 1m\n linger 100ms\n}")

	const n = 500
	clients := make([]*sseClient, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for i := range n {
		wg.Go(func() {
			c, err := tryConnect(sharedTransport, base+"/a", nil)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			clients[i] = c
		})
	}
	wg.Wait()
	for _, c := range clients {
		if c != nil {
			t.Cleanup(c.close)
		}
	}
	if len(errs) > 0 {
		t.Fatalf("%d of %d clients failed to connect, first: %v", len(errs), n, errs[0])
	}
	other := connect(t, base+"/b", nil)
	for _, c := range clients[:3] {
		if c.resp.StatusCode != 200 || c.resp.Header.Get("Content-Type") != "text/event-stream" ||
			c.resp.Header.Get("Cache-Control") != "no-cache, no-transform" || c.resp.Header.Get("X-Accel-Buffering") != "no" {
			t.Fatalf("unexpected response head: %d %v", c.resp.StatusCode, c.resp.Header)
		}
		if c.resp.Header.Get("X-Origin") != "yes" {
			t.Fatalf("origin header not passed on: %v", c.resp.Header)
		}
	}
	o.waitOpen(t, "/a", 1, 5*time.Second)
	o.waitOpen(t, "/b", 1, 5*time.Second)
	if got := o.total.Load(); got != 2 {
		t.Fatalf("origin saw %d connections for 2 paths and %d clients, want 2", got, n+1)
	}

	var want strings.Builder
	for i := 1; i <= 200; i++ {
		e := ev(i, fmt.Sprintf(`{"n":%d,"pad":"%s"}`, i, strings.Repeat("x", 100)))
		want.WriteString(e)
		o.send("/a", e)
	}
	o.send("/b", ev(7, "b"))

	deadline := time.Now().Add(60 * time.Second)
	for i, c := range clients {
		for c.events() != want.String() {
			if time.Now().After(deadline) || len(c.events()) > want.Len() {
				t.Fatalf("client %d: got %d bytes, want %d; got %q", i, len(c.events()), want.Len(), truncate(c.events(), 300))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	other.waitFor(t, ev(7, "b"), 5*time.Second)
	if got := other.events(); got != ev(7, "b") {
		t.Fatalf("client of /b got %q", got)
	}
	if got := o.total.Load(); got != 2 {
		t.Fatalf("origin saw %d connections, want 2", got)
	}
}

func TestResumeFromHistory(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n}")

	a := connect(t, base+"/s", nil)
	o.waitOpen(t, "/s", 1, 5*time.Second)
	for i := 1; i <= 5; i++ {
		o.send("/s", ev(i, fmt.Sprint("m", i)))
	}
	a.waitFor(t, ev(5, "m5"), 5*time.Second)

	// a client that saw up to 2 gets exactly 3, 4 and 5, from history
	b := connect(t, base+"/s", http.Header{"Last-Event-Id": {"2"}})
	want := ev(3, "m3") + ev(4, "m4") + ev(5, "m5")
	b.waitFor(t, want, 5*time.Second)
	// the lastEventId query parameter works the same when there is no header
	q := connect(t, base+"/s?lastEventId=4", nil)
	q.waitFor(t, ev(5, "m5"), 5*time.Second)
	// a new client without Last-Event-ID starts live, with the committed id
	live := connect(t, base+"/s", nil)
	live.waitFor(t, "id: 5\n\n", 5*time.Second)

	o.send("/s", ev(6, "m6"))
	b.waitFor(t, want+ev(6, "m6"), 5*time.Second)
	q.waitFor(t, ev(5, "m5")+ev(6, "m6"), 5*time.Second)
	live.waitFor(t, "id: 5\n\n"+ev(6, "m6"), 5*time.Second)
	if got := b.events(); got != want+ev(6, "m6") {
		t.Fatalf("resumed client got %q", got)
	}
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections, want 1 (resume must come from history)", got)
	}

	// a cold stream created with Last-Event-ID asks the origin to resume
	cold := connect(t, base+"/cold", http.Header{"Last-Event-Id": {"42"}})
	o.waitOpen(t, "/cold", 1, 5*time.Second)
	req := lastRequest(t, o, "/cold")
	if got := req.Header.Get("Last-Event-Id"); got != "42" {
		t.Fatalf("cold stream's upstream Last-Event-ID = %q, want 42", got)
	}
	if req.Header.Get("Accept") != "text/event-stream" || req.Header.Get("Cache-Control") != "no-cache" {
		t.Fatalf("upstream request headers: %v", req.Header)
	}
	o.send("/cold", "data: after42\n\n")
	// the event carries no id line: the browser keeps its own 42, and the
	// client's id never becomes one that other clients receive
	cold.waitFor(t, "data: after42\n\n", 5*time.Second)
	if got := cold.events(); got != "data: after42\n\n" {
		t.Fatalf("creating client got %q", got)
	}
}

// lastRequest returns the newest request the origin recorded for path.
func lastRequest(t testing.TB, o *origin, path string) *http.Request {
	t.Helper()
	var last *http.Request
	deadline := time.After(5 * time.Second)
	for {
		select {
		case r := <-o.requests:
			if r.URL.RequestURI() == path {
				last = r
			}
		case <-deadline:
			if last == nil {
				t.Fatalf("origin saw no request for %s", path)
			}
			return last
		default:
			if last != nil {
				return last
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func TestUpstreamDropResumesWithLastEventID(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	prelude := "retry: 100\n\n"
	o.prelude.Store(&prelude)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n}")

	c1 := connect(t, base+"/d", nil)
	o.waitOpen(t, "/d", 1, 5*time.Second)
	c2 := connect(t, base+"/d", nil)
	for i := 1; i <= 3; i++ {
		o.send("/d", ev(i, "x"))
	}
	c1.waitFor(t, ev(3, "x"), 5*time.Second)
	c2.waitFor(t, ev(3, "x"), 5*time.Second)
	for len(o.requests) > 0 {
		<-o.requests
	}
	o.dropPath("/d")
	o.waitOpen(t, "/d", 1, 10*time.Second)
	if got := lastRequest(t, o, "/d").Header.Get("Last-Event-Id"); got != "3" {
		t.Fatalf("reconnect Last-Event-ID = %q, want 3", got)
	}
	for i := 4; i <= 6; i++ {
		o.send("/d", ev(i, "x"))
	}
	want := "retry: 100\n" + ev(1, "x") + ev(2, "x") + ev(3, "x") + "retry: 100\n" + ev(4, "x") + ev(5, "x") + ev(6, "x")
	c1.waitFor(t, ev(6, "x"), 5*time.Second)
	if got := c1.events(); got != want {
		t.Fatalf("first client got\n%q\nwant\n%q", got, want)
	}
	c2.waitFor(t, ev(6, "x"), 5*time.Second)
	if got := c2.events(); !strings.HasSuffix(got, ev(3, "x")+"retry: 100\n"+ev(4, "x")+ev(5, "x")+ev(6, "x")) || strings.Count(got, "data:") != 6 {
		t.Fatalf("second client got %q", got)
	}
}

func TestKeepaliveAndLinger(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n keepalive 200ms\n linger 1s\n}")

	c := connect(t, base+"/k", nil)
	eventually(t, 5*time.Second, func() bool { return strings.Count(c.bytes(), ": keepalive\n") >= 3 }, func() string {
		return fmt.Sprintf("want at least 3 keepalive comments in 5s, got %q", c.bytes())
	})
	o.waitOpen(t, "/k", 1, 5*time.Second)
	c.close()
	time.Sleep(500 * time.Millisecond)
	if got := o.open("/k"); got != 1 {
		t.Fatalf("upstream closed %d streams before linger ran out", 1-got)
	}
	o.waitOpen(t, "/k", 0, 10*time.Second)
	checkNoLeaks(t)
}

func TestStuckClientIsDropped(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n write_timeout 1s\n linger 100ms\n}")

	stuck := dialStuck(t, base, "/slow")
	o.waitOpen(t, "/slow", 1, 5*time.Second)
	const others = 20
	var cs []*sseClient
	for range others {
		cs = append(cs, connect(t, base+"/slow", nil))
	}
	s := findStream(t, "/slow")
	eventually(t, 5*time.Second, func() bool { return clientCount(s) == others+1 }, func() string { return "clients did not attach" })

	payload := strings.Repeat("y", 64<<10)
	var want strings.Builder
	start := time.Now()
	i := 0
	for clientCount(s) > others {
		if time.Since(start) > 60*time.Second || i*len(payload) > 256<<20 {
			t.Fatalf("stuck client not dropped after %v and %d MiB", time.Since(start), i*len(payload)>>20)
		}
		i++
		e := ev(i, payload)
		want.WriteString(e)
		o.send("/slow", e)
		// a pace the readers keep up with even under the race detector
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("stuck client dropped after %v and %d events of 64KiB", time.Since(start).Round(time.Millisecond), i)
	stuck.Close()
	for j, c := range cs {
		if c.ended() {
			t.Fatalf("client %d was dropped too (%d bytes received)", j, len(c.bytes()))
		}
		c.waitFor(t, ev(i, payload), 30*time.Second)
		if got := c.events(); got != want.String() {
			t.Fatalf("client %d: stream incomplete or out of order (%d of %d bytes)", j, len(got), want.Len())
		}
	}
}

func TestOriginAnswers(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n status_wait 5s\n}")
	cases := []struct {
		name, ctype, body string
		status, want      int
	}{
		{"not found", "text/plain", "no such stream", 404, 404},
		{"server error", "text/plain", "boom", 500, 500},
		{"html", "text/html", "<p>hi</p>", 200, 502},
		{"no content", "", "", 204, 204},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o.setHandler(func(w http.ResponseWriter, r *http.Request) {
				if tc.ctype != "" {
					w.Header().Set("Content-Type", tc.ctype)
				}
				w.WriteHeader(tc.status)
				_, _ = io.WriteString(w, tc.body)
			})
			defer o.setHandler(nil)
			resp, err := sharedTransport.RoundTrip(mustRequest(t, base+"/"+strings.ReplaceAll(tc.name, " ", "-")))
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want {
				t.Fatalf("status %d, want %d (body %q)", resp.StatusCode, tc.want, body)
			}
			switch tc.want {
			case 404, 500:
				if string(body) != tc.body || resp.Header.Get("Content-Type") != tc.ctype {
					t.Fatalf("origin's answer not passed on as sent: %q %v", body, resp.Header)
				}
			case 502:
				if !strings.Contains(string(body), "text/html") {
					t.Fatalf("502 body should name the content type: %q", body)
				}
			}
		})
	}
}

func mustRequest(t testing.TB, url string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	return req
}

func TestOriginDownThenUp(t *testing.T) {
	leakCheck(t)
	port := freePort(t)
	originURL := fmt.Sprintf("http://127.0.0.1:%d", port)
	base := startCaddy(t, "sse_fanout "+originURL+" {\n keepalive 200ms\n linger 100ms\n}")

	start := time.Now()
	c := connect(t, base+"/up", nil)
	if c.resp.StatusCode != 200 {
		t.Fatalf("status %d while the origin is down, want 200", c.resp.StatusCode)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("a refused origin should answer the client at once, took %v", d)
	}
	eventually(t, 5*time.Second, func() bool { return strings.Contains(c.bytes(), ": keepalive\n") }, func() string { return "no keepalive while the origin is down" })

	o := newOriginOn(t, port)
	o.waitOpen(t, "/up", 1, 20*time.Second)
	o.send("/up", ev(1, "hello"))
	c.waitFor(t, ev(1, "hello"), 5*time.Second)
}

func TestOrigin503IsHidden(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	var mu sync.Mutex
	fails := 2
	def := o.serve
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		fail := fails > 0
		fails--
		mu.Unlock()
		if fail {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		o.setHandler(nil)
		def(w, r)
	})
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n keepalive 200ms\n linger 100ms\n}")
	c := connect(t, base+"/busy", nil)
	if c.resp.StatusCode != 200 {
		t.Fatalf("client saw %d while the origin answered 503, want 200", c.resp.StatusCode)
	}
	o.waitOpen(t, "/busy", 1, 20*time.Second)
	o.send("/busy", ev(1, "ok"))
	c.waitFor(t, ev(1, "ok"), 5*time.Second)
	if strings.Contains(c.bytes(), "busy") {
		t.Fatalf("the 503 body reached the client: %q", c.bytes())
	}
}

func TestCredentials(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	// bcrypt of "secret" at the lowest cost, so that each request checks
	// it fast
	const hash = "$2a$04$lZ4MJvKzCa9MOexW0jSrIehHAiybX/IiewE/.19QP7of.FT.3GGDe"
	base := startCaddy(t, fmt.Sprintf(`
	handle /plain/* {
		sse_fanout %[1]s {
			linger 100ms
		}
	}
	handle /peruser/* {
		sse_fanout %[1]s {
			vary Authorization
			linger 100ms
		}
	}
	handle /protected/* {
		basic_auth {
			alice %[2]s
		}
		sse_fanout %[1]s {
			linger 100ms
		}
	}`, o.URL, hash))

	// by default no credential reaches the origin
	connect(t, base+"/plain/x", http.Header{"Authorization": {"Bearer alice"}, "Cookie": {"session=alice"}})
	o.waitOpen(t, "/plain/x", 1, 5*time.Second)
	req := lastRequest(t, o, "/plain/x")
	if req.Header.Get("Authorization") != "" || req.Header.Get("Cookie") != "" {
		t.Fatalf("credentials forwarded by default: %v", req.Header)
	}

	// vary Authorization: one stream per credential, each sees its own
	alice := connect(t, base+"/peruser/x", http.Header{"Authorization": {"Bearer alice"}})
	bob := connect(t, base+"/peruser/x", http.Header{"Authorization": {"Bearer bob"}})
	alice2 := connect(t, base+"/peruser/x", http.Header{"Authorization": {"Bearer alice"}})
	o.waitOpen(t, "/peruser/x", 2, 5*time.Second)
	o.mu.Lock()
	for c := range o.subs["/peruser/x"] {
		c.out <- []byte("data: for " + c.req.Header.Get("Authorization") + "\n\n")
	}
	o.mu.Unlock()
	alice.waitFor(t, "data: for Bearer alice\n\n", 5*time.Second)
	alice2.waitFor(t, "data: for Bearer alice\n\n", 5*time.Second)
	bob.waitFor(t, "data: for Bearer bob\n\n", 5*time.Second)
	if strings.Contains(alice.bytes(), "bob") || strings.Contains(bob.bytes(), "alice") {
		t.Fatalf("streams crossed: alice %q bob %q", alice.bytes(), bob.bytes())
	}

	// basic_auth in front: 401 without credentials, one upstream with
	resp, err := sharedTransport.RoundTrip(mustRequest(t, base+"/protected/x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("unauthenticated status %d, want 401", resp.StatusCode)
	}
	auth := http.Header{"Authorization": {"Basic YWxpY2U6c2VjcmV0"}}
	p1 := connect(t, base+"/protected/x", auth)
	p2 := connect(t, base+"/protected/x", auth)
	if p1.resp.StatusCode != 200 || p2.resp.StatusCode != 200 {
		t.Fatalf("authenticated status %d %d", p1.resp.StatusCode, p2.resp.StatusCode)
	}
	o.waitOpen(t, "/protected/x", 1, 5*time.Second)
	o.send("/protected/x", ev(1, "p"))
	p1.waitFor(t, ev(1, "p"), 5*time.Second)
	p2.waitFor(t, ev(1, "p"), 5*time.Second)
	if got := o.open("/protected/x"); got != 1 {
		t.Fatalf("authenticated clients opened %d upstreams, want 1", got)
	}
}

// TestFirstClientGetsFirstEvent: the clients that create a stream wait for
// the origin's first answer; whatever the origin sent with it is theirs,
// and the origin's retry line reaches them once.
func TestFirstClientGetsFirstEvent(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	prelude := "retry: 2000\n\nid: 1\ndata: first\n\n"
	o.prelude.Store(&prelude)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n}")

	c := connect(t, base+"/cold1", nil)
	c.waitFor(t, "data: first\n\n", 5*time.Second)
	o.send("/cold1", ev(2, "second"))
	want := "retry: 2000\n" + ev(1, "first") + ev(2, "second")
	c.waitFor(t, ev(2, "second"), 5*time.Second)
	if got := c.events(); got != want {
		t.Fatalf("first client got %q, want %q", got, want)
	}
	// a later client gets the retry in force and the committed id
	late := connect(t, base+"/cold1", nil)
	late.waitFor(t, "id: 2\n\n", 5*time.Second)
	if got := late.events(); got != "retry: 2000\nid: 2\n\n" {
		t.Fatalf("late client got %q", got)
	}
	// a cold resume gets the retry once too
	r := connect(t, base+"/cold2", http.Header{"Last-Event-Id": {"0"}})
	r.waitFor(t, "data: first\n\n", 5*time.Second)
	if got := r.events(); got != "retry: 2000\n"+ev(1, "first") {
		t.Fatalf("cold resume got %q", got)
	}
}

func TestUpstreamRequestAndMethods(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	t.Setenv("SSEFANOUT_TEST_KEY", "k123")
	def := o.stream
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/old" {
			http.Redirect(w, r, "/new?x=1", http.StatusFound)
			return
		}
		w.Header().Set("Set-Cookie", "origin=secret")
		w.Header().Set("Etag", `"abc"`)
		w.Header().Set("X-Served-By", "origin")
		def(w, r)
	})
	base := startCaddy(t, "route {\n sse_fanout "+o.URL+` {
		linger 100ms
		header_up Host origin.internal
		header_up X-Api-Key {env.SSEFANOUT_TEST_KEY}
		header_up -Cache-Control
	}
	respond "next handler" 200
	}`)

	// HEAD: stream headers only, no upstream
	req, _ := http.NewRequest(http.MethodHead, base+"/head", nil)
	resp, err := sharedTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("HEAD: %d %v", resp.StatusCode, resp.Header)
	}
	// OPTIONS goes to the next handler
	req, _ = http.NewRequest(http.MethodOptions, base+"/head", nil)
	resp, err = sharedTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "next handler" {
		t.Fatalf("OPTIONS was not passed to the next handler: %d %q", resp.StatusCode, body)
	}
	if got := o.total.Load(); got != 0 {
		t.Fatalf("HEAD or OPTIONS reached the origin %d times", got)
	}

	// redirects are followed; header_up applies; cookies and validators stay at the proxy
	c := connect(t, base+"/old", nil)
	o.waitOpen(t, "/new?x=1", 1, 5*time.Second)
	r := lastRequest(t, o, "/new?x=1")
	if r.Host != "origin.internal" || r.Header.Get("X-Api-Key") != "k123" || r.Header.Get("Cache-Control") != "" || r.Header.Get("Accept") != "text/event-stream" {
		t.Fatalf("upstream request: host %q headers %v", r.Host, r.Header)
	}
	if c.resp.Header.Get("Set-Cookie") != "" || c.resp.Header.Get("Etag") != "" || c.resp.Header.Get("X-Served-By") != "origin" {
		t.Fatalf("response headers: %v", c.resp.Header)
	}
	o.send("/new?x=1", ev(1, "moved"))
	c.waitFor(t, ev(1, "moved"), 5*time.Second)
}

// TestHostileRequestsAndRedirects: an id no header can carry never reaches
// the upstream request (it would fail every attempt), and a redirect off
// the upstream's host is refused with a 502.
func TestHostileRequestsAndRedirects(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	def := o.stream
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/away" {
			http.Redirect(w, r, "http://127.0.0.2:1/elsewhere", http.StatusFound)
			return
		}
		def(w, r)
	})
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n}")

	c := connect(t, base+"/ctl?lastEventId=%01", nil)
	o.waitOpen(t, "/ctl", 1, 5*time.Second)
	if got := lastRequest(t, o, "/ctl").Header.Get("Last-Event-Id"); got != "" {
		t.Fatalf("control-character id sent upstream: %q", got)
	}
	o.send("/ctl", ev(1, "ok"))
	c.waitFor(t, ev(1, "ok"), 5*time.Second)

	resp, err := sharedTransport.RoundTrip(mustRequest(t, base+"/away"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "another host") {
		t.Fatalf("redirect to another host: %d %q", resp.StatusCode, body)
	}
}

// TestHTTP2IdleStreamSurvivesWriteTimeout: HTTP/2 resets a stream whose
// write deadline passes even when nothing is being written, so an idle
// client (keepalive off) must outlive write_timeout.
func TestHTTP2IdleStreamSurvivesWriteTimeout(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddyWith(t, "protocols h1 h2c", "sse_fanout "+o.URL+` {
		write_timeout 1s
		keepalive off
		linger 100ms
	}`)
	c := connectH2(t, newH2CTransport(t), base+"/h2")
	o.waitOpen(t, "/h2", 1, 5*time.Second)
	o.send("/h2", ev(1, "before"))
	c.waitFor(t, ev(1, "before"), 5*time.Second)
	time.Sleep(2500 * time.Millisecond) // idle past write_timeout
	if c.ended() {
		t.Fatalf("idle HTTP/2 stream was reset after write_timeout: %v", c.err)
	}
	o.send("/h2", ev(2, "after"))
	c.waitFor(t, ev(2, "after"), 5*time.Second)
}
