package tests

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Downstream protocols: HTTPS with Caddy's internal CA over HTTP/1.1,
// HTTP/2 and HTTP/3 next to plaintext HTTP/1.1, all on one stream. Each
// client asserts the events and ids it receives, one event at a time.

// protoClient is a client of one protocol and what it must see.
type protoClient struct {
	name  string
	rt    http.RoundTripper
	url   string
	proto string // resp.Proto
	tls   bool
}

// eventN is the wire form of the test event n, with its id.
func eventN(n int) string { return fmt.Sprintf("id: %d\ndata: event %d\n\n", n, n) }

// expectEvents reads the events from..to from every stream in turn, the
// origin sending each only after every stream got the one before: so each
// arrives on its own, as it is sent.
func expectEvents(t *testing.T, o *origin, path string, streams []*eventStream, from, to int) {
	t.Helper()
	for n := from; n <= to; n++ {
		o.send(path, eventN(n))
		want := sseEvent{ID: fmt.Sprint(n), Data: fmt.Sprintf("event %d", n)}
		for _, s := range streams {
			if got := s.next(t, 10*time.Second); got != want {
				t.Fatalf("%s client: got %+v, want %+v", s.Resp.Proto, got, want)
			}
		}
	}
}

// waitGauges waits until the module's client gauges read clients and
// direct.
func waitGauges(t *testing.T, c *caddyServer, clients, direct float64) {
	t.Helper()
	var got map[string]float64
	var err error
	eventually(t, 10*time.Second, func() bool {
		got, err = c.metrics("caddy_sse_fanout_clients", "caddy_sse_fanout_direct_clients")
		return err == nil && got["caddy_sse_fanout_clients"] == clients && got["caddy_sse_fanout_direct_clients"] == direct
	}, func() string {
		return fmt.Sprintf("metrics %v (%v), want %v clients of which %v direct", got, err, clients, direct)
	})
}

// One stream, four protocols: HTTPS (Caddy's internal CA) over HTTP/1.1,
// HTTP/2 and HTTP/3, and plaintext HTTP/1.1, each site with the same
// sse_fanout. Every client gets every event with its id as it is sent,
// and resumes by Last-Event-ID from the history; the origin sees one
// connection; only the plaintext client is written directly, the TLS ones
// stay on net/http; every protocol's hang-up is noticed.
func TestProtocolsOverTLS(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	p := freePorts(t, 2)
	tlsPort, plainPort := p[0], p[1]
	cs := startCaddySites(t, fmt.Sprintf(`
https://127.0.0.1:%[1]d {
	bind 127.0.0.1
	sse_fanout %[3]s
}
http://127.0.0.1:%[2]d {
	bind 127.0.0.1
	sse_fanout %[3]s
}`, tlsPort, plainPort, o.URL))
	cs.waitCertificate(t, fmt.Sprintf("127.0.0.1:%d", tlsPort))
	cl := newHTTPClients(t, cs.roots(t))
	https := fmt.Sprintf("https://127.0.0.1:%d/s", tlsPort)
	clients := []protoClient{
		{"TLS HTTP/1.1", cl.h1, https, "HTTP/1.1", true},
		{"TLS HTTP/2", cl.h2, https, "HTTP/2.0", true},
		{"HTTP/3", cl.h3, https, "HTTP/3.0", true},
		{"plaintext HTTP/1.1", cl.plain, fmt.Sprintf("http://127.0.0.1:%d/s", plainPort), "HTTP/1.1", false},
	}
	// opens a stream per client, checking after each that only the
	// plaintext ones are written directly
	open := func(hdr http.Header) []*eventStream {
		var streams []*eventStream
		direct := 0
		for i, c := range clients {
			s := openStream(t, c.rt, c.url, hdr)
			if s.Resp.StatusCode != http.StatusOK || s.Resp.Proto != c.proto || (s.Resp.TLS != nil) != c.tls {
				t.Fatalf("%s client: status %d, proto %s, TLS %v; want 200, %s, TLS %v", c.name, s.Resp.StatusCode, s.Resp.Proto, s.Resp.TLS != nil, c.proto, c.tls)
			}
			if ct := s.Resp.Header.Get("Content-Type"); ct != "text/event-stream" {
				t.Fatalf("%s client: Content-Type %q", c.name, ct)
			}
			if !c.tls {
				direct++
			}
			waitGauges(t, cs.caddyServer, float64(i+1), float64(direct))
			streams = append(streams, s)
		}
		return streams
	}

	streams := open(nil)
	// the TCP answers advertise HTTP/3 on the same port, as browsers see it
	for _, s := range streams[:2] {
		if alt, want := s.Resp.Header.Get("Alt-Svc"), fmt.Sprintf(`h3=":%d"`, tlsPort); !strings.Contains(alt, want) {
			t.Fatalf("%s answer: Alt-Svc %q, want it to advertise %s", s.Resp.Proto, alt, want)
		}
	}
	expectEvents(t, o, "/s", streams, 1, 3)
	if n := o.total.Load(); n != 1 {
		t.Fatalf("origin saw %d connections for 4 clients of one stream, want 1", n)
	}

	// every client hangs up, and the module notices each
	for _, s := range streams {
		s.close()
	}
	waitGauges(t, cs.caddyServer, 0, 0)
	cs.sendToHistory(t, o, "/s", eventN(4), eventN(5))

	// each comes back with Last-Event-ID: 3 and gets 4 and 5 from the
	// history, then 6 live
	streams = open(http.Header{"Last-Event-Id": {"3"}})
	for _, s := range streams {
		for n := 4; n <= 5; n++ {
			want := sseEvent{ID: fmt.Sprint(n), Data: fmt.Sprintf("event %d", n)}
			if got := s.next(t, 10*time.Second); got != want {
				t.Fatalf("%s client resuming from 3: got %+v, want %+v", s.Resp.Proto, got, want)
			}
		}
	}
	expectEvents(t, o, "/s", streams, 6, 6)
	if n := o.total.Load(); n != 1 {
		t.Fatalf("origin saw %d connections, want 1 across hang-ups and resumes", n)
	}
}

// `encode gzip zstd` in front of sse_fanout: clients that accept gzip and
// zstd get the stream unencoded (sse_fanout answers with Cache-Control:
// no-transform) and each event as it is sent, over plaintext HTTP/1.1
// (still written directly: nothing is encoded), HTTP/2 and HTTP/3; a plain
// text answer of the same site is compressed, so encode is at work.
func TestEncodeInFront(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	p := freePorts(t, 2)
	tlsPort, plainPort := p[0], p[1]
	site := fmt.Sprintf(`{
	bind 127.0.0.1
	encode gzip zstd
	handle /text {
		header Content-Type text/plain
		respond "%s"
	}
	sse_fanout %s
}`, strings.Repeat("compressible ", 100), o.URL)
	cs := startCaddySites(t, fmt.Sprintf("https://127.0.0.1:%d %s\nhttp://127.0.0.1:%d %s", tlsPort, site, plainPort, site))
	cs.waitCertificate(t, fmt.Sprintf("127.0.0.1:%d", tlsPort))
	cl := newHTTPClients(t, cs.roots(t))
	https, plain := fmt.Sprintf("https://127.0.0.1:%d", tlsPort), fmt.Sprintf("http://127.0.0.1:%d", plainPort)
	clients := []protoClient{
		{"plaintext HTTP/1.1", cl.plain, plain, "HTTP/1.1", false},
		{"TLS HTTP/2", cl.h2, https, "HTTP/2.0", true},
		{"HTTP/3", cl.h3, https, "HTTP/3.0", true},
	}
	acceptEncoding := http.Header{"Accept-Encoding": {"gzip, zstd"}}

	var streams []*eventStream
	for _, c := range clients {
		req, _ := http.NewRequest(http.MethodGet, c.url+"/text", nil)
		req.Header = acceptEncoding.Clone()
		text, err := c.rt.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s client: %v", c.name, err)
		}
		text.Body.Close()
		if ce := text.Header.Get("Content-Encoding"); ce == "" {
			t.Fatalf("%s client: a plain text answer came back unencoded; is encode in force?", c.name)
		}

		s := openStream(t, c.rt, c.url+"/s", acceptEncoding)
		h := s.Resp.Header
		if s.Resp.StatusCode != http.StatusOK || s.Resp.Proto != c.proto {
			t.Fatalf("%s client: status %d over %s", c.name, s.Resp.StatusCode, s.Resp.Proto)
		}
		if ce := h.Get("Content-Encoding"); ce != "" || !strings.Contains(h.Get("Cache-Control"), "no-transform") {
			t.Fatalf("%s client: Content-Encoding %q, Cache-Control %q; want no encoding, no-transform", c.name, ce, h.Get("Cache-Control"))
		}
		streams = append(streams, s)
	}
	waitGauges(t, cs.caddyServer, 3, 1)
	expectEvents(t, o, "/s", streams, 1, 5)
	if n := o.total.Load(); n != 1 {
		t.Fatalf("origin saw %d connections, want 1", n)
	}
}

// authChecker is a small auth service for forward_auth: 204 for the
// bearer token "good", 403 for any other token, 401 with a challenge
// without one. It counts the checks it answered.
type authChecker struct {
	URL    string // host:port
	checks atomic.Int64
}

// newAuthChecker starts an authChecker on loopback; it stops at test
// cleanup.
func newAuthChecker(t *testing.T) *authChecker {
	t.Helper()
	a := &authChecker{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.checks.Add(1)
		switch r.Header.Get("Authorization") {
		case "Bearer good":
			w.WriteHeader(http.StatusNoContent)
		case "":
			w.Header().Set("WWW-Authenticate", `Bearer realm="events"`)
			http.Error(w, "sign in first", http.StatusUnauthorized)
		default:
			http.Error(w, "not yours", http.StatusForbidden)
		}
	}))
	t.Cleanup(srv.Close)
	a.URL = strings.TrimPrefix(srv.URL, "http://")
	return a
}

// forward_auth in front of sse_fanout: every request is checked by the
// auth service; the authorised clients share one upstream connection and
// get every event with its id, and a resume is checked again; refused
// requests get the auth service's status, headers and body, before the
// stream exists and while it is live, and never reach the origin.
func TestForwardAuthInFront(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	auth := newAuthChecker(t)
	port := freePort(t)
	startCaddySites(t, fmt.Sprintf(`http://127.0.0.1:%d {
	bind 127.0.0.1
	forward_auth %s {
		uri /check
	}
	sse_fanout %s
}`, port, auth.URL, o.URL))
	rt := newHTTPClients(t, nil).plain
	url := fmt.Sprintf("http://127.0.0.1:%d/s", port)
	bearer := func(tok string) http.Header { return http.Header{"Authorization": {"Bearer " + tok}} }

	refused := func(when string) {
		t.Helper()
		for _, c := range []struct {
			hdr    http.Header
			status int
			body   string
		}{{nil, http.StatusUnauthorized, "sign in first"}, {bearer("bad"), http.StatusForbidden, "not yours"}} {
			s := openStream(t, rt, url, c.hdr)
			body, _ := io.ReadAll(s.Resp.Body)
			s.close()
			if s.Resp.StatusCode != c.status || strings.TrimSpace(string(body)) != c.body {
				t.Fatalf("%s: refused client got %d %q, want the auth service's %d %q", when, s.Resp.StatusCode, body, c.status, c.body)
			}
			if c.status == http.StatusUnauthorized && s.Resp.Header.Get("WWW-Authenticate") == "" {
				t.Fatalf("%s: the auth service's challenge did not reach the client: %v", when, s.Resp.Header)
			}
		}
	}
	refused("before the stream exists")
	if n := o.total.Load(); n != 0 {
		t.Fatalf("refused clients reached the origin: %d requests", n)
	}

	var streams []*eventStream
	for range 3 {
		s := openStream(t, rt, url, bearer("good"))
		if s.Resp.StatusCode != http.StatusOK {
			t.Fatalf("authorised client: status %d", s.Resp.StatusCode)
		}
		streams = append(streams, s)
	}
	expectEvents(t, o, "/s", streams, 1, 3)
	refused("while the stream is live")
	expectEvents(t, o, "/s", streams, 4, 4)

	// a resume is checked again, and served from the history
	streams[0].close()
	resumed := openStream(t, rt, url, http.Header{"Authorization": {"Bearer good"}, "Last-Event-Id": {"2"}})
	for n := 3; n <= 4; n++ {
		if got, want := resumed.next(t, 10*time.Second), (sseEvent{fmt.Sprint(n), fmt.Sprintf("event %d", n)}); got != want {
			t.Fatalf("resumed client: got %+v, want %+v", got, want)
		}
	}
	expectEvents(t, o, "/s", append(streams[1:], resumed), 5, 5)

	if n := o.total.Load(); n != 1 {
		t.Fatalf("origin saw %d connections, want 1 for every authorised client", n)
	}
	if n := auth.checks.Load(); n != 2+3+2+1 {
		t.Fatalf("auth service answered %d checks, want 8: one per request", n)
	}
}
