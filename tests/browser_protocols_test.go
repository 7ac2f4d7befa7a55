package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

// Downstream protocols in headless Chromium: the README's CORS recipe from
// a page of another origin, and HTTP/3 reached the way browsers reach it,
// through Alt-Svc.

// streamPage is a page whose EventSource at url records every event as
// "lastEventId|data" and its opens and errors; with fetchToo, a fetch-based
// client (what polyfills do) reads the same URL with an Authorization
// header and records its events the same way, until window.stopFetch().
func streamPage(url string, fetchToo bool) string {
	return fmt.Sprintf(`<!doctype html>
<meta charset="utf-8">
<title>sse_fanout protocol test</title>
<script>
const url = %q;
window.es = {got: [], life: []};
const es = new EventSource(url);
es.onmessage = (e) => window.es.got.push(e.lastEventId + "|" + e.data);
es.onopen = () => window.es.life.push("open");
es.onerror = () => window.es.life.push("error:" + es.readyState);

window.fetched = {status: 0, got: [], error: ""};
const stop = new AbortController();
window.stopFetch = () => stop.abort();
async function fetchStream() {
	try {
		const resp = await fetch(url, {headers: {"Authorization": "Bearer t", "Accept": "text/event-stream"}, signal: stop.signal});
		window.fetched.status = resp.status;
		const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
		let buf = "", id = "";
		for (;;) {
			const {value, done} = await reader.read();
			if (done) throw new Error("the stream ended");
			buf += value;
			for (let i; (i = buf.indexOf("\n\n")) >= 0; buf = buf.slice(i + 2)) {
				const data = [];
				for (const line of buf.slice(0, i).split("\n")) {
					if (line.startsWith("id: ")) id = line.slice(4);
					if (line.startsWith("data: ")) data.push(line.slice(6));
				}
				if (data.length) window.fetched.got.push(id + "|" + data.join("\n"));
			}
		}
	} catch (e) {
		window.fetched.error = String(e);
	}
}
if (%t) fetchStream();
</script>
`, url, fetchToo)
}

// streamPageState is what a streamPage recorded.
type streamPageState struct {
	ES struct {
		Got  []string `json:"got"`
		Life []string `json:"life"`
	} `json:"es"`
	Fetched struct {
		Status int      `json:"status"`
		Got    []string `json:"got"`
		Error  string   `json:"error"`
	} `json:"fetched"`
}

// waitStreamPage polls a streamPage until cond holds, for at most within.
func waitStreamPage(t *testing.T, ctx context.Context, within time.Duration, what string, cond func(streamPageState) bool) streamPageState {
	t.Helper()
	var st streamPageState
	var err error
	eventually(t, within, func() bool {
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		st, err = chromedp.Run(tctx, chromedp.Evaluate[streamPageState](`({es: window.es, fetched: window.fetched})`))
		return err == nil && cond(st)
	}, func() string { return fmt.Sprintf("page: %s: not within %v: %+v (%v)", what, within, st, err) })
	return st
}

// navigate loads url in the browser's tab.
func navigate(t *testing.T, ctx context.Context, url string) {
	t.Helper()
	nctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := chromedp.Run(nctx, chromedp.Navigate(url)); err != nil {
		t.Fatalf("loading %s: %v", url, err)
	}
}

// writePage writes a site root holding index.html and returns the root.
func writePage(t *testing.T, html string) string {
	t.Helper()
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(html), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

// readmeCORSRecipe returns the README's CORS recipe, the caddyfile block
// after "CORS for cross-origin", with the README's page origin and upstream
// replaced.
func readmeCORSRecipe(t *testing.T, pageOrigin, upstream string) string {
	t.Helper()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatalf("reading the README: %v", err)
	}
	_, rest, ok := strings.Cut(string(readme), "CORS for cross-origin")
	if ok {
		_, rest, ok = strings.Cut(rest, "```caddyfile\n")
	}
	recipe, _, ok2 := strings.Cut(rest, "```")
	const readmeOrigin, readmeUpstream = "https://app.example.com", "http://127.0.0.1:3000"
	if !ok || !ok2 || !strings.Contains(recipe, readmeOrigin) || !strings.Contains(recipe, "sse_fanout "+readmeUpstream) {
		t.Fatalf("the README's CORS recipe (a caddyfile block after \"CORS for cross-origin\", allowing %s, upstream %s) not found; update this test with the README", readmeOrigin, readmeUpstream)
	}
	recipe = strings.ReplaceAll(recipe, readmeOrigin, pageOrigin)
	return strings.ReplaceAll(recipe, "sse_fanout "+readmeUpstream, "sse_fanout "+upstream)
}

// accessEntry is a request in Caddy's access log.
type accessEntry struct {
	Request struct {
		Method  string      `json:"method"`
		URI     string      `json:"uri"`
		Proto   string      `json:"proto"`
		Headers http.Header `json:"headers"`
	} `json:"request"`
	Status      int         `json:"status"`
	RespHeaders http.Header `json:"resp_headers"`
}

// readAccessLog returns the entries of an access log file so far.
func readAccessLog(t *testing.T, path string) []accessEntry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("access log: %v", err)
	}
	defer f.Close()
	var out []accessEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var e accessEntry
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("access log line %q: %v", sc.Text(), err)
		}
		out = append(out, e)
	}
	return out
}

// The README's CORS recipe, copied from the README, on a site whose page
// is on another origin (another port): a cross-origin EventSource gets
// every event with its lastEventId, with no preflight, also when it
// reconnects with Last-Event-ID after a reload and resumes from the
// history; a fetch-based client sending Authorization is preflighted, the
// recipe answers the preflight, and the client gets the same events. The
// origin sees one connection.
func TestBrowserCORSRecipe(t *testing.T) {
	leakCheck(t)
	requireChromium(t)
	o := newOrigin(t)
	ports := freePorts(t, 2)
	pagePort, streamPort := ports[0], ports[1]
	pageOrigin := fmt.Sprintf("http://127.0.0.1:%d", pagePort)
	streamURL := fmt.Sprintf("http://127.0.0.1:%d/s", streamPort)
	accessLog := filepath.Join(t.TempDir(), "access.log")
	sites := fmt.Sprintf(`http://127.0.0.1:%d {
	bind 127.0.0.1
	root * %s
	file_server
}
http://127.0.0.1:%d {
	bind 127.0.0.1
	log {
		output file %s
	}
%s}`, pagePort, writePage(t, streamPage(streamURL, true)), streamPort, accessLog, readmeCORSRecipe(t, pageOrigin, o.URL))
	cs := startCaddySites(t, sites)
	ctx := startBrowser(t)
	navigate(t, ctx, pageOrigin+"/")

	o.waitOpen(t, "/s", 1, 20*time.Second)
	waitStreamPage(t, ctx, 20*time.Second, "EventSource and fetch open", func(st streamPageState) bool {
		return (slices.Equal(st.ES.Life, []string{"open"}) && st.Fetched.Status == 200) || st.Fetched.Error != ""
	})
	o.send("/s", "retry: 1000\nid: 1\ndata: one\n\n")
	o.send("/s", "id: 2\ndata: two\n\n")
	o.send("/s", "id: 3\ndata: three\n\n")
	want := []string{"1|one", "2|two", "3|three"}
	st := waitStreamPage(t, ctx, 20*time.Second, "events 1-3 on both clients", func(st streamPageState) bool {
		return (len(st.ES.Got) >= 3 && len(st.Fetched.Got) >= 3) || st.Fetched.Error != ""
	})
	if !slices.Equal(st.ES.Got, want) || !slices.Equal(st.Fetched.Got, want) || st.Fetched.Error != "" {
		var answers []string
		for _, e := range readAccessLog(t, accessLog) {
			if e.Request.Method == http.MethodOptions {
				answers = append(answers, fmt.Sprintf("%d %v", e.Status, e.RespHeaders))
			}
		}
		t.Fatalf("cross-origin clients got\nEventSource %q\nfetch %q (error %q)\nwant %q\npreflights answered: %q", st.ES.Got, st.Fetched.Got, st.Fetched.Error, want, answers)
	}

	// the fetch client leaves; a reload ends the EventSource's stream,
	// and it comes back by itself with Last-Event-ID: 3 and resumes from
	// the history
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := chromedp.Run(sctx, chromedp.Evaluate[chromedp.Void](`window.stopFetch()`))
	cancel()
	if err != nil {
		t.Fatalf("stopping the fetch client: %v", err)
	}
	waitGauges(t, cs.caddyServer, 1, 1)
	cs.reload(t, sites)
	waitGauges(t, cs.caddyServer, 0, 0)
	cs.sendToHistory(t, o, "/s", "id: 4\ndata: four\n\n", "id: 5\ndata: five\n\n")
	waitStreamPage(t, ctx, 20*time.Second, "the EventSource reopened", func(st streamPageState) bool { return len(st.ES.Life) >= 3 })
	o.send("/s", "id: 6\ndata: six\n\n")
	want = append(want, "4|four", "5|five", "6|six")
	st = waitStreamPage(t, ctx, 20*time.Second, "events 1-6 on the EventSource", func(st streamPageState) bool { return len(st.ES.Got) >= 6 })
	if !slices.Equal(st.ES.Got, want) || !slices.Equal(st.ES.Life, []string{"open", "error:0", "open"}) {
		t.Fatalf("the cross-origin EventSource got %q (life %q), want %q once each across one reconnect", st.ES.Got, st.ES.Life, want)
	}
	if n := o.total.Load(); n != 1 {
		t.Fatalf("origin saw %d connections, want 1", n)
	}

	// what reached the stream's site: one preflight, the fetch client's,
	// answered by the recipe; the EventSource's two GETs, the second with
	// Last-Event-ID, and the fetch client's GET with Authorization
	var preflights, esGets, fetchGets []accessEntry
	for _, e := range readAccessLog(t, accessLog) {
		switch {
		case e.Request.Method == "OPTIONS":
			preflights = append(preflights, e)
		case e.Request.Headers.Get("Authorization") != "":
			fetchGets = append(fetchGets, e)
		default:
			esGets = append(esGets, e)
		}
	}
	if len(preflights) != 1 || len(fetchGets) != 1 || len(esGets) != 2 {
		t.Fatalf("stream site saw %d preflights, %d fetch GETs, %d EventSource GETs; want 1, 1, 2", len(preflights), len(fetchGets), len(esGets))
	}
	p := preflights[0]
	if acrh := strings.ToLower(p.Request.Headers.Get("Access-Control-Request-Headers")); p.Status != 204 || !strings.Contains(acrh, "authorization") ||
		p.RespHeaders.Get("Access-Control-Allow-Origin") != pageOrigin || !strings.Contains(p.RespHeaders.Get("Access-Control-Allow-Headers"), "authorization") {
		t.Fatalf("preflight: status %d, request headers %v, response headers %v", p.Status, p.Request.Headers, p.RespHeaders)
	}
	if id := esGets[1].Request.Headers.Get("Last-Event-Id"); id != "3" || esGets[0].Request.Headers.Get("Last-Event-Id") != "" {
		t.Fatalf("EventSource GETs carried Last-Event-ID %q then %q, want none then 3", esGets[0].Request.Headers.Get("Last-Event-Id"), id)
	}
	for _, e := range slices.Concat(esGets, fetchGets) {
		if e.Status != 200 || e.RespHeaders.Get("Access-Control-Allow-Origin") != pageOrigin {
			t.Fatalf("GET answered %d with Access-Control-Allow-Origin %q, want 200 and %s", e.Status, e.RespHeaders.Get("Access-Control-Allow-Origin"), pageOrigin)
		}
	}
}

// tabResponses records the responses a browser tab receives, with the
// protocol each came over, as DevTools shows them.
type tabResponses struct {
	mu   sync.Mutex
	list []tabResponse
}

// tabResponse is one response a tab received.
type tabResponse struct {
	URL, Type, Protocol, Usage string
}

// recordResponses starts recording the responses of the browser's tab.
func recordResponses(t *testing.T, ctx context.Context) *tabResponses {
	t.Helper()
	r := &tabResponses{}
	err := chromedp.Listen(ctx, func(ev any) {
		if e, ok := ev.(*network.EventResponseReceived); ok {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.list = append(r.list, tabResponse{e.Response.URL, string(e.Type), e.Response.Protocol, string(e.Response.AlternateProtocolUsage)})
		}
	})
	if err != nil {
		t.Fatalf("listening to the tab: %v", err)
	}
	return r
}

// of returns the responses of the given resource type so far.
func (r *tabResponses) of(typ network.ResourceType) []tabResponse {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []tabResponse
	for _, x := range r.list {
		if x.Type == string(typ) {
			out = append(out, x)
		}
	}
	return out
}

// An EventSource in Chromium over HTTPS with Caddy's internal CA, over
// HTTP/1.1 (Chromium with HTTP/2 off) and over HTTP/2: each gets every
// event with its id, and neither is written directly (TLS clients stay on
// net/http).
func TestBrowserTLS(t *testing.T) {
	leakCheck(t)
	requireChromium(t)
	o := newOrigin(t)
	port := freePort(t)
	cs := startCaddySites(t, fmt.Sprintf(`https://127.0.0.1:%d {
	bind 127.0.0.1
	handle_path /events/* {
		sse_fanout %s
	}
	handle {
		root * %s
		file_server
	}
}`, port, o.URL, writePage(t, streamPage("/events/s", false))))
	leaf := cs.waitCertificate(t, fmt.Sprintf("127.0.0.1:%d", port))
	trust := chromedp.Flag("ignore-certificate-errors-spki-list", spkiHash(leaf))
	for i, c := range []struct {
		name, proto string // proto as DevTools names it
		flags       []chromedp.ExecAllocatorOption
	}{
		{"h1", "http/1.1", []chromedp.ExecAllocatorOption{trust, chromedp.Flag("disable-http2", true)}},
		{"h2", "h2", []chromedp.ExecAllocatorOption{trust}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := startBrowser(t, c.flags...)
			resps := recordResponses(t, ctx)
			navigate(t, ctx, fmt.Sprintf("https://127.0.0.1:%d/", port))
			waitStreamPage(t, ctx, 20*time.Second, "EventSource open", func(st streamPageState) bool { return len(st.ES.Life) > 0 })
			waitGauges(t, cs.caddyServer, 1, 0)
			var want []string
			for n := 2*i + 1; n <= 2*i+2; n++ {
				o.send("/s", eventN(n))
				want = append(want, fmt.Sprintf("%d|event %d", n, n))
			}
			st := waitStreamPage(t, ctx, 20*time.Second, "two events", func(st streamPageState) bool { return len(st.ES.Got) >= 2 })
			if !slices.Equal(st.ES.Got, want) || !slices.Equal(st.ES.Life, []string{"open"}) {
				t.Fatalf("EventSource got %q (life %q), want %q", st.ES.Got, st.ES.Life, want)
			}
			if got := resps.of(network.ResourceTypeEventSource); len(got) != 1 || got[0].Protocol != c.proto {
				t.Fatalf("EventSource answers %+v, want one over %s", got, c.proto)
			}
		})
	}
	if n := o.total.Load(); n != 1 {
		t.Fatalf("origin saw %d connections, want 1", n)
	}
}

// waitNextHop fetches path from the page until it comes over proto, as
// the page's Resource Timing reports it, for at most within; it returns
// the protocols of the fetches.
func waitNextHop(t *testing.T, ctx context.Context, path, proto string, within time.Duration) []string {
	t.Helper()
	var got []string
	var err error
	eventually(t, within, func() bool {
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		var p string
		p, err = chromedp.Run(tctx, chromedp.Evaluate[string](fmt.Sprintf(`fetch(%[1]q, {cache: "no-store"}).then(r => r.text()).then(() =>
			performance.getEntriesByName(new URL(%[1]q, location).href).at(-1).nextHopProtocol)`, path), chromedp.EvalAwaitPromise))
		got = append(got, p)
		if p != proto {
			time.Sleep(50 * time.Millisecond)
		}
		return err == nil && p == proto
	}, func() string {
		return fmt.Sprintf("fetches of %s from the page came over %q (%v), never %s", path, got, err, proto)
	})
	return got
}

// HTTP/3 the way browsers move to it (caddyserver/caddy#6537): the page
// and its EventSource start over HTTP/2, and the stream's answer is the
// first to carry Caddy's Alt-Svc (the page's files are served without it).
// Chromium then moves to HTTP/3 for its next requests while the open
// HTTP/2 stream keeps delivering; when the stream is ended (a reload), the
// EventSource reconnects over HTTP/3 with Last-Event-ID and resumes from
// the history, each event once, in order, with its id. The origin sees one
// connection.
//
// Chromium accepts a certificate of a CA outside its root store for QUIC
// only on hosts named in --origin-to-force-quic-on: it names this host
// with another, unused port, so that this port is reached through Alt-Svc
// and not forced; --ignore-certificate-errors-spki-list trusts the leaf.
func TestBrowserHTTP3(t *testing.T) {
	leakCheck(t)
	requireChromium(t)
	o := newOrigin(t)
	port := freePort(t)
	base := fmt.Sprintf("https://127.0.0.1:%d", port)
	root := writePage(t, streamPage("/events/s", false))
	if err := os.WriteFile(filepath.Join(root, "hello.txt"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	sites := fmt.Sprintf(`https://127.0.0.1:%d {
	bind 127.0.0.1
	handle_path /events/* {
		sse_fanout %s
	}
	handle {
		header -Alt-Svc
		root * %s
		file_server
	}
}`, port, o.URL, root)
	cs := startCaddySites(t, sites)
	leaf := cs.waitCertificate(t, fmt.Sprintf("127.0.0.1:%d", port))
	ctx := startBrowser(t,
		chromedp.Flag("disable-quic", false),
		chromedp.Flag("enable-quic", true),
		chromedp.Flag("origin-to-force-quic-on", fmt.Sprintf("127.0.0.1:%d", freePort(t))),
		chromedp.Flag("ignore-certificate-errors-spki-list", spkiHash(leaf)),
	)
	resps := recordResponses(t, ctx)
	navigate(t, ctx, base+"/")
	o.waitOpen(t, "/s", 1, 20*time.Second)
	waitGauges(t, cs.caddyServer, 1, 0)
	o.send("/s", "retry: 1000\nid: 1\ndata: one\n\n")
	o.send("/s", "id: 2\ndata: two\n\n")
	waitStreamPage(t, ctx, 20*time.Second, "events 1-2", func(st streamPageState) bool { return len(st.ES.Got) >= 2 })
	if got := resps.of(network.ResourceTypeEventSource); len(got) != 1 || got[0].Protocol != "h2" {
		t.Fatalf("EventSource answers %+v, want one, over h2 (no answer had advertised h3 before it)", got)
	}

	// the stream's answer advertised h3: the page's requests move to
	// HTTP/3 (once Chromium's QUIC connection is up: the first ones may
	// still take the open HTTP/2 connection), and the HTTP/2 stream goes
	// on
	waitNextHop(t, ctx, "/hello.txt", "h3", 10*time.Second)
	o.send("/s", "id: 3\ndata: three\n\n")
	st := waitStreamPage(t, ctx, 20*time.Second, "event 3 on the HTTP/2 stream", func(st streamPageState) bool { return len(st.ES.Got) >= 3 })
	if !slices.Equal(st.ES.Life, []string{"open"}) {
		t.Fatalf("the HTTP/2 EventSource was disturbed by the move to HTTP/3: life %q", st.ES.Life)
	}

	// a reload ends the stream; the EventSource reconnects over HTTP/3
	// with Last-Event-ID: 3 and resumes from the history
	cs.reload(t, sites)
	waitGauges(t, cs.caddyServer, 0, 0)
	cs.sendToHistory(t, o, "/s", "id: 4\ndata: four\n\n", "id: 5\ndata: five\n\n")
	waitStreamPage(t, ctx, 20*time.Second, "the EventSource reopened", func(st streamPageState) bool { return len(st.ES.Life) >= 3 })
	o.send("/s", "id: 6\ndata: six\n\n")
	want := []string{"1|one", "2|two", "3|three", "4|four", "5|five", "6|six"}
	st = waitStreamPage(t, ctx, 20*time.Second, "events 1-6", func(st streamPageState) bool { return len(st.ES.Got) >= 6 })
	if !slices.Equal(st.ES.Got, want) || !slices.Equal(st.ES.Life, []string{"open", "error:0", "open"}) {
		t.Fatalf("EventSource got %q (life %q), want %q once each across one reconnect", st.ES.Got, st.ES.Life, want)
	}
	if got := resps.of(network.ResourceTypeEventSource); len(got) != 2 || got[1].Protocol != "h3" {
		t.Fatalf("EventSource answers %+v, want the reconnect over h3", got)
	}
	if n := o.total.Load(); n != 1 {
		t.Fatalf("origin saw %d connections, want 1", n)
	}
}
