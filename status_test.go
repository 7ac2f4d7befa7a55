package ssefanout

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// statusSite is a site with fanned-out streams under /s/ and the status
// page at /status.
func statusSite(originURL, statusOpts string) string {
	return `handle /status {
		sse_fanout_status ` + statusOpts + `
	}
	handle /metrics {
		metrics
	}
	handle_path /s/* {
		sse_fanout ` + originURL + `/base
	}`
}

// getStatus fetches the status page's JSON report.
func getStatus(t testing.TB, url string, hdr http.Header) (statusReport, *http.Response) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Accept", "application/json")
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := sharedTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var rep statusReport
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &rep); err != nil {
			t.Fatalf("status JSON: %v: %s", err, body)
		}
	}
	resp.Body = io.NopCloser(strings.NewReader(string(body)))
	return rep, resp
}

// waitStatus polls the JSON report until ok accepts it.
func waitStatus(t testing.TB, url string, ok func(statusReport) bool) statusReport {
	t.Helper()
	var rep statusReport
	eventually(t, 10*time.Second, func() bool {
		rep, _ = getStatus(t, url, nil)
		return ok(rep)
	}, func() string {
		b, _ := json.Marshal(rep)
		return "status report never matched: " + string(b)
	})
	return rep
}

// The page reports what the streams do: clients, the one upstream
// connection and the fan-out ratio, events and deliveries, history fill,
// the configured upstream template and never the expanded path or query.
func TestStatusReportsStreams(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))

	// before any stream: no division by zero, no stream
	rep := waitStatus(t, base+"/status", func(r statusReport) bool { return r.Server != "" })
	if rep.Streams != 0 || rep.FanoutRatio != nil || rep.UpstreamsOpen != 0 {
		t.Fatalf("report without streams: %+v", rep)
	}

	const n, k = 3, 10
	var cs []*sseClient
	for range n {
		cs = append(cs, connect(t, base+"/s/tenant-a?token=sekrit", nil))
	}
	o.waitOpen(t, "/base/tenant-a?token=sekrit", 1, 5*time.Second)
	for i := 1; i <= k; i++ {
		o.send("/base/tenant-a?token=sekrit", ev(i, "x"))
	}
	for _, c := range cs {
		c.waitFor(t, ev(k, "x"), 5*time.Second)
	}
	rep = waitStatus(t, base+"/status", func(r statusReport) bool {
		return r.Clients == n && len(r.Shown) == 1 && r.Shown[0].Deliveries == n*k
	})
	if rep.UpstreamsOpen != 1 || rep.FanoutRatio == nil || *rep.FanoutRatio != n || rep.Streams != 1 {
		t.Fatalf("totals: %+v", rep)
	}
	s := rep.Shown[0]
	if s.Upstream != o.URL+"/base" || s.State != "live" || s.Events != k || s.HistoryEvents != k ||
		s.HistoryCapacity != defaultHistory || s.FanoutRatio == nil || *s.FanoutRatio != n || !s.UpstreamHere || s.UptimeSeconds <= 0 {
		t.Fatalf("stream: %+v", s)
	}
	if s.BytesSent < uint64(n*len(ev(k, "x"))*k/2) {
		t.Fatalf("bytes sent %d is less than the events' bytes", s.BytesSent)
	}
	if len(rep.History) == 0 || rep.History[len(rep.History)-1].Clients != n {
		t.Fatalf("sparkline history: %+v", rep.History)
	}
	_, resp := getStatus(t, base+"/status", nil)
	body, _ := io.ReadAll(resp.Body)
	for _, secret := range []string{"tenant-a", "sekrit", "token"} {
		if strings.Contains(string(body), secret) {
			t.Fatalf("status report shows %q: %s", secret, body)
		}
	}

	// the rates settle at zero once the events stop
	waitStatus(t, base+"/status", func(r statusReport) bool {
		return len(r.Shown) == 1 && r.EventsPerSec == 0 && r.Shown[0].DeliveriesSec == 0
	})
	// the upstream goes: the ratio is "none", not a division by zero
	o.dropAll()
	waitStatus(t, base+"/status", func(r statusReport) bool {
		return r.UpstreamsOpen == 0 && r.FanoutRatio == nil && len(r.Shown) == 1 && r.Shown[0].FanoutRatio == nil
	})
}

// The page is one self-contained document; the same URL streams reports
// to EventSource, the whole first and then without the sparkline history.
func TestStatusPageAndStream(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))

	resp, err := http.Get(base + "/status")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("page: %d %v", resp.StatusCode, resp.Header)
	}
	// no external assets: nothing loaded from another URL
	if m := regexp.MustCompile(`(?i)(src|href)\s*=|@import|url\(|https?://[^"' ]*\.(js|css)`).Find(page); m != nil {
		t.Fatalf("the page refers to an external asset: %q", m)
	}
	if !strings.Contains(string(page), "new EventSource(") {
		t.Fatal("the page does not open its event stream")
	}

	c := connect(t, base+"/status", nil)
	if ct := c.resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("stream content type %q", ct)
	}
	var reports []statusReport
	eventually(t, 10*time.Second, func() bool {
		reports = reports[:0]
		for _, line := range strings.Split(c.bytes(), "\n") {
			if data, ok := strings.CutPrefix(line, "data: "); ok {
				var r statusReport
				if err := json.Unmarshal([]byte(data), &r); err != nil {
					t.Fatalf("a report is not JSON: %v: %q", err, data)
				}
				reports = append(reports, r)
			}
		}
		return len(reports) >= 3
	}, func() string { return "fewer than 3 reports in 10s: " + c.bytes() })
	if len(reports[0].History) == 0 || reports[1].History != nil || reports[2].Point.Time <= reports[1].Point.Time {
		t.Fatalf("first report has %d history points, second %d; points at %d, %d",
			len(reports[0].History), len(reports[1].History), reports[1].Point.Time, reports[2].Point.Time)
	}
	if !strings.HasPrefix(c.bytes(), "retry: ") {
		t.Fatalf("stream does not set its retry: %q", truncate(c.bytes(), 100))
	}

	resp, err = http.Post(base+"/status", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST answered %d", resp.StatusCode)
	}
}

// Only loopback clients see the page unless allow_remote is set; the
// client address is Caddy's, so a forged X-Forwarded-For from an untrusted
// peer changes nothing, and a trusted proxy's does.
func TestStatusLoopbackOnly(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	for _, tc := range []struct {
		name, global, opts string
		forwardedFor       string
		want               int
	}{
		{"loopback", "", "", "", 200},
		{"forged header from an untrusted peer", "", "", "203.0.113.9", 200},
		{"remote through a trusted proxy", "trusted_proxies static 127.0.0.0/8", "", "203.0.113.9", 403},
		{"loopback through a trusted proxy", "trusted_proxies static 127.0.0.0/8", "", "127.0.0.2", 200},
		{"remote allowed", "trusted_proxies static 127.0.0.0/8", "{\n allow_remote\n }", "203.0.113.9", 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := startCaddyWith(t, tc.global, statusSite(o.URL, tc.opts))
			hdr := http.Header{}
			if tc.forwardedFor != "" {
				hdr.Set("X-Forwarded-For", tc.forwardedFor)
			}
			_, resp := getStatus(t, base+"/status", hdr)
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.want {
				t.Fatalf("answered %d, want %d: %s", resp.StatusCode, tc.want, body)
			}
		})
	}
}

// A reload ends the page's stream (Caddy's default grace period would
// wait for it forever); the page reconnects to the new config.
func TestStatusStreamEndsOnReload(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	port := freePort(t)
	src := caddyfileFor(port, statusSite(o.URL, ""))
	loadCaddyfile(t, src)
	t.Cleanup(func() { _ = caddy.Stop() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)
	c := connect(t, base+"/status", nil)
	c.waitFor(t, "data: ", 5*time.Second)
	start := time.Now()
	loadCaddyfile(t, strings.Replace(src, "grace_period 2s", "grace_period 1m", 1))
	c.waitEnded(t, 5*time.Second)
	if !c.cleanEnd() {
		t.Fatalf("the stream did not end cleanly: %v", c.err)
	}
	t.Logf("status stream ended %v after the reload began", time.Since(start))
	// the new config serves the page, with the sparkline kept
	rep := waitStatus(t, base+"/status", func(r statusReport) bool { return len(r.History) >= 2 })
	if rep.Server == "" {
		t.Fatal("no server name")
	}
}

// The page's viewers are bounded: one more than the bound gets 503.
func TestStatusViewersBounded(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))
	for range maxStatusViewers {
		connect(t, base+"/status", nil)
	}
	req, _ := http.NewRequest(http.MethodGet, base+"/status", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := sharedTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(resp.Body).ReadString('\n')
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("viewer %d answered %d %q", maxStatusViewers+1, resp.StatusCode, line)
	}
	// the JSON report still answers
	if _, resp := getStatus(t, base+"/status", nil); resp.StatusCode != 200 {
		t.Fatalf("JSON answered %d with the viewers full", resp.StatusCode)
	}
}

// The directive's mistakes fail at load, naming the line.
func TestStatusCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		input, want string
		remote      bool
	}{
		{"sse_fanout_status", "", false},
		{"sse_fanout_status {\n allow_remote\n}", "", true},
		{"sse_fanout_status /status", `unexpected argument "/status"`, false}, // a matcher is taken before the handler sees it
		{"sse_fanout_status {\n allow_remote yes\n}", `allow_remote takes no value, got "yes", at Testfile:2`, false},
		{"sse_fanout_status {\n allow_remote\n allow_remote\n}", "allow_remote: specified more than once, at Testfile:3", true},
		{"sse_fanout_status {\n interval 5s\n}", `unrecognized option "interval"; sse_fanout_status takes allow_remote, at Testfile:2`, false},
	} {
		var p StatusPage
		err := p.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.input, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: error %v, want one containing %q", tc.input, err, tc.want)
		case p.AllowRemote != tc.remote:
			t.Errorf("%q: allow_remote %v", tc.input, p.AllowRemote)
		}
	}
	// the page runs before a catch-all sse_fanout, whatever the order in
	// the site
	cfg, _, err := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}.Adapt(
		[]byte("http://127.0.0.1:1 {\n sse_fanout http://127.0.0.1:2\n sse_fanout_status /status\n}"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if s, f := strings.Index(string(cfg), `"handler":"sse_fanout_status"`), strings.Index(string(cfg), `"handler":"sse_fanout"`); s < 0 || f < 0 || s > f {
		t.Fatalf("the status page is not routed before sse_fanout: %s", cfg)
	}
	// through the adapter, the matcher is the directive's
	port := freePort(t)
	err = tryLoadCaddyfile(caddyfileFor(port, "sse_fanout_status /status extra"))
	if err == nil || !strings.Contains(err.Error(), `unexpected argument "extra"`) || !strings.Contains(err.Error(), "Caddyfile:9") {
		t.Fatalf("load error %v, want the extra argument at Caddyfile:9", err)
	}
}

// A report lists the streams with the most clients, up to a bound; the
// totals count every stream.
func TestStatusListsTheBusiestStreams(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))
	const n = statusStreamsShown + 5
	for i := range n {
		connect(t, fmt.Sprintf("%s/s/q%03d", base, i), nil)
	}
	connect(t, base+"/s/q042", nil) // the busiest
	rep := waitStatus(t, base+"/status", func(r statusReport) bool { return r.Streams == n && r.Clients == n+1 })
	if len(rep.Shown) != statusStreamsShown || rep.Shown[0].Clients != 2 || rep.Shown[1].Clients != 1 {
		t.Fatalf("%d streams shown, the first with %d clients", len(rep.Shown), rep.Shown[0].Clients)
	}
}

// The loopback-only page answers only Hosts that name this host, against
// DNS rebinding; over TLS the name is the site's own.
func TestStatusHostNamesThisHost(t *testing.T) {
	for host, want := range map[string]bool{
		"localhost": true, "LOCALHOST:8080": true, "app.localhost:80": true, "localhost.": true,
		"127.0.0.1": true, "127.1.2.3:9": true, "[::1]:8080": true, "[::ffff:127.0.0.1]:1": true,
		"rebind.attacker.example": false, "rebind.attacker.example:8080": false, "localhost.attacker.example": false,
		"10.0.0.1": false, "": false, "[::1": false,
	} {
		r := httptest.NewRequest(http.MethodGet, "/status", nil)
		r.Host = host
		if got := namesThisHost(r); got != want {
			t.Errorf("Host %q: %v, want %v", host, got, want)
		}
	}
	r := httptest.NewRequest(http.MethodGet, "https://example.com/status", nil)
	if !namesThisHost(r) {
		t.Error("over TLS, the site's own name is refused")
	}
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

// DNS rebinding: a web page of another site, once its name resolves to
// 127.0.0.1, reads a loopback-only page from the victim's own browser,
// which connects from loopback. On a site without a host (":8080"), any
// Host reaches the handler; the page should answer only Hosts that name
// this host (localhost, a loopback address), as Caddy's admin API does.

func TestStatusRefusesARebindingHost(t *testing.T) {
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
