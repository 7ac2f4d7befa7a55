package ssefanout

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// What one client's request can and cannot do to another's stream: the
// upstream URL and stream key a request maps to, and the ids other clients
// receive. Each case goes through a real Caddy and a real origin, and
// checks the bytes on the wire.

// rawGet sends one GET on a raw socket (so that the target reaches Caddy
// exactly as written) and returns the response, whose body is read by the
// caller.
func rawGet(t testing.TB, base, target string, headers ...string) (*http.Response, net.Conn) {
	t.Helper()
	addr := strings.TrimPrefix(base, "http://")
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n", target, addr)
	for _, h := range headers {
		b.WriteString(h + "\r\n")
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("GET %s: reading the response: %v", target, err)
	}
	return resp, conn
}

// drainRequests forgets the origin requests recorded so far.
func drainRequests(o *origin) {
	for len(o.requests) > 0 {
		<-o.requests
	}
}

// nextRequest returns the origin's next request, or nil after within.
func nextRequest(o *origin, within time.Duration) *http.Request {
	select {
	case r := <-o.requests:
		return r
	case <-time.After(within):
		return nil
	}
}

// A placeholder in the upstream path expands to exactly one path segment:
// an empty value is refused (it would make the base path another tenant's
// prefix), and a value with a slash is escaped (it would merge with
// another tenant's deeper path).
func TestPathPlaceholderIsOneSegment(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+"/tenants/{http.request.header.X-Tenant} {\n linger 200ms\n}")

	acme := connect(t, base+"/events", http.Header{"X-Tenant": {"acme"}})
	o.waitOpen(t, "/tenants/acme/events", 1, 5*time.Second)
	drainRequests(o)

	// no tenant: the request must not reach acme's stream, nor the origin
	resp, _ := rawGet(t, base, "/acme/events")
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("empty tenant: status %d, want 400; body %q", resp.StatusCode, body)
	}
	if r := nextRequest(o, 300*time.Millisecond); r != nil {
		t.Errorf("empty tenant: the origin was asked for %s", r.RequestURI)
	}

	// "acme/x" + "/events" and "acme" + "/x/events" are two streams
	slashed := connect(t, base+"/events", http.Header{"X-Tenant": {"acme/x"}})
	deeper := connect(t, base+"/x/events", http.Header{"X-Tenant": {"acme"}})
	o.waitOpen(t, "/tenants/acme%2Fx/events", 1, 5*time.Second)
	o.waitOpen(t, "/tenants/acme/x/events", 1, 5*time.Second)

	o.send("/tenants/acme/events", ev(1, "for acme"))
	o.send("/tenants/acme/x/events", ev(2, "for acme, /x"))
	o.send("/tenants/acme%2Fx/events", ev(3, "for acme/x"))
	acme.waitFor(t, ev(1, "for acme"), 5*time.Second)
	deeper.waitFor(t, ev(2, "for acme, /x"), 5*time.Second)
	slashed.waitFor(t, ev(3, "for acme/x"), 5*time.Second)
	time.Sleep(100 * time.Millisecond)
	for name, c := range map[string]*sseClient{"acme": acme, "acme /x": deeper, "acme/x": slashed} {
		if n := strings.Count(c.events(), "data: "); n != 1 {
			t.Errorf("client %s received %d events, want only its own: %q", name, n, c.events())
		}
	}
}

// Query placeholders are escaped as query values, and a client's own query
// can add parameters but never remove or override the fixed ones.
func TestQueryPlaceholdersAreValues(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout \""+o.URL+"/q?tenant={http.request.header.X-Tenant}&scope=public&t={http.request.uri.query.t}\" {\n linger off\n}")

	cases := []struct {
		target string
		header string
		tenant string // the origin must read these
		t      string
	}{
		{"/?x=1", "X-Tenant: acme#", "acme#", ""},
		{"/?t=acme%26scope%3Dadmin", "X-Tenant: acme", "acme", "acme&scope=admin"},
		{"/?x=1", "X-Tenant: a b&c=d", "a b&c=d", ""},
		{"/?scope=admin&tenant=evil", "X-Tenant: acme", "acme", ""},
	}
	for _, tc := range cases {
		drainRequests(o)
		resp, conn := rawGet(t, base, tc.target, tc.header)
		r := nextRequest(o, 5*time.Second)
		conn.Close()
		resp.Body.Close()
		if r == nil {
			t.Errorf("%s %q: the origin was not asked (status %d)", tc.target, tc.header, resp.StatusCode)
			continue
		}
		q := r.URL.Query()
		t.Logf("%s %q -> %s", tc.target, tc.header, r.RequestURI)
		if got := q["tenant"]; len(got) != 1 || got[0] != tc.tenant {
			t.Errorf("%s %q: origin read tenant=%q, want only %q (request %s)", tc.target, tc.header, got, tc.tenant, r.RequestURI)
		}
		if got := q["scope"]; len(got) != 1 || got[0] != "public" {
			t.Errorf("%s %q: origin read scope=%q, want only the fixed \"public\" (request %s)", tc.target, tc.header, got, r.RequestURI)
		}
		if got := q.Get("t"); got != tc.t {
			t.Errorf("%s %q: origin read t=%q, want %q", tc.target, tc.header, got, tc.t)
		}
		if strings.ContainsAny(r.RequestURI, " #") {
			t.Errorf("%s %q: raw space or # in the upstream request line %q", tc.target, tc.header, r.RequestURI)
		}
	}
}

// Segments that some servers treat as a parent directory, and control
// characters, are refused before the origin is asked.
func TestParentLikeSegmentsAreRefused(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+"/base {\n linger off\n}")
	for _, target := range []string{
		"/..;/admin", "/..%3b/admin", "/..%3Bx=1/admin", "/..%00/admin", "/.;/admin",
		"/a/..;jsessionid=1/b", "/%2e%2e;/admin", "/a%00b", "/a%0ab", "/a%7fb", "/..%20/admin",
	} {
		drainRequests(o)
		resp, conn := rawGet(t, base, target)
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		conn.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", target, resp.StatusCode)
		}
		if len(strings.TrimSpace(string(body))) == 0 || strings.Count(string(body), "\n") > 1 {
			t.Errorf("%s: body %q, want one line saying why", target, body)
		}
		if r := nextRequest(o, 200*time.Millisecond); r != nil {
			t.Errorf("%s: the origin was asked for %s", target, r.RequestURI)
		}
	}
	// ordinary dots still pass
	for _, target := range []string{"/a..b/c", "/.well-known/x", "/v1.2/x"} {
		drainRequests(o)
		resp, conn := rawGet(t, base, target)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: status %d, want 200", target, resp.StatusCode)
		}
		if r := nextRequest(o, 5*time.Second); r == nil || r.URL.Path != "/base"+target {
			t.Errorf("%s: origin request %v, want /base%s", target, r, target)
		}
		conn.Close()
	}
}

// A client's Last-Event-ID may be sent upstream to create a stream, but
// never becomes an id that other clients receive.
func TestClientIDIsNeverBroadcast(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 5s\n}")
	attackerID := "ATTACKER-<b>x</b>"

	attacker := connect(t, base+"/n?lastEventId="+url.QueryEscape(attackerID), nil)
	o.waitOpen(t, "/n", 1, 5*time.Second)
	if got := lastRequest(t, o, "/n").Header.Get("Last-Event-Id"); got != attackerID {
		t.Fatalf("the cold stream was opened with Last-Event-ID %q, want the creating client's %q", got, attackerID)
	}
	attacker.close()
	eventually(t, 5*time.Second, func() bool { return clientCount(findStream(t, "/n")) == 0 }, func() string { return "attacker still attached" })

	victim := connect(t, base+"/n", nil)
	eventually(t, 5*time.Second, func() bool { return clientCount(findStream(t, "/n")) == 1 }, func() string { return "victim not attached" })
	o.send("/n", "data: no id from the origin\n\n")
	victim.waitFor(t, "data: no id from the origin\n\n", 5*time.Second)
	if got := victim.events(); got != "data: no id from the origin\n\n" {
		t.Fatalf("victim received %q, want the origin's event with no id", got)
	}
}

// An origin's 101 answer is not relayed: nobody asked to switch protocols.
func TestOriginSwitchingProtocolsIsBadGateway(t *testing.T) {
	leakCheck(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = http.ReadRequest(bufio.NewReader(c))
				_, _ = io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\nX-Origin-Secret: s\r\n\r\nRAW BYTES")
				time.Sleep(2 * time.Second)
			}()
		}
	}()
	base := startCaddy(t, "sse_fanout http://"+ln.Addr().String()+" {\n linger off\n}")
	resp, conn := rawGet(t, base, "/up")
	defer conn.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d %q, want 502", resp.StatusCode, body)
	}
	if resp.Header.Get("X-Origin-Secret") != "" || resp.Header.Get("Upgrade") != "" || strings.Contains(string(body), "RAW") {
		t.Fatalf("origin's 101 leaked: %v %q", resp.Header, body)
	}
	if !strings.Contains(string(body), "101") {
		t.Errorf("body %q does not say what the origin answered", body)
	}
}
