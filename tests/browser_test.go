package tests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// The browser test: what a real EventSource (headless Chromium) dispatches
// through the proxy must equal what it dispatches straight from the origin,
// and a browser that the proxy drops resumes from the shared history.

const chromiumPath = "/usr/bin/chromium"

// browserPage opens one EventSource through the proxy and one straight to
// the origin (through reverse_proxy), on the same origin as the page, and
// records every dispatched event and every open and error.
const browserPage = `<!doctype html>
<meta charset="utf-8">
<title>sse_fanout browser test</title>
<script>
window.got = {proxy: [], direct: []};
window.life = {proxy: [], direct: []};
window.es = {};
for (const [name, url] of [["proxy", "/proxy/s"], ["direct", "/direct/s"]]) {
	const es = new EventSource(url);
	window.es[name] = es;
	const record = (e) => window.got[name].push({type: e.type, data: e.data, lastEventId: e.lastEventId});
	es.addEventListener("message", record);
	es.addEventListener("custom", record);
	es.addEventListener("open", () => window.life[name].push("open"));
	es.addEventListener("error", () => window.life[name].push("error:" + es.readyState));
}
</script>
`

// jsEvent is a dispatched MessageEvent as the page recorded it.
type jsEvent struct {
	Type        string `json:"type"`
	Data        string `json:"data"`
	LastEventID string `json:"lastEventId"`
}

func (e jsEvent) String() string {
	return fmt.Sprintf("{%s %q id=%q}", e.Type, e.Data, e.LastEventID)
}

type pageState struct {
	Got struct {
		Proxy  []jsEvent `json:"proxy"`
		Direct []jsEvent `json:"direct"`
	} `json:"got"`
	Life struct {
		Proxy  []string `json:"proxy"`
		Direct []string `json:"direct"`
	} `json:"life"`
}

// browserFlags are the Chromium flags for a quiet, loopback-only browser.
func browserFlags(userDataDir string) []chromedp.ExecAllocatorOption {
	return []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-background-timer-throttling", true),
		chromedp.Flag("disable-renderer-backgrounding", true),
		chromedp.UserDataDir(userDataDir),
	}
}

// requireChromium fails the test when Chromium is missing: the browser
// test is part of the suite, never skipped.
func requireChromium(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Fatalf("the browser test needs Debian's chromium at %s (%v): run ./scripts/test, the README's test command, which installs it", chromiumPath, err)
	}
}

// startBrowser starts headless Chromium; it is killed at test cleanup.
func startBrowser(t *testing.T, extra ...chromedp.ExecAllocatorOption) context.Context {
	t.Helper()
	requireChromium(t)
	userData := t.TempDir() // removed after the browser is gone (cleanups run in reverse)
	var logMu sync.Mutex
	var logs []string
	logf := func(format string, args ...any) {
		logMu.Lock()
		defer logMu.Unlock()
		if len(logs) < 100 {
			logs = append(logs, fmt.Sprintf(format, args...))
		}
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), append(browserFlags(userData), extra...)...)
	ctx, cancel := chromedp.NewContext(allocCtx, chromedp.WithErrorf(logf))
	t.Cleanup(func() {
		tctx, tcancel := context.WithTimeout(ctx, 10*time.Second)
		defer tcancel()
		_ = chromedp.Cancel(tctx)
		cancel()
		cancelAlloc() // kills the process if it did not close
		if t.Failed() {
			logMu.Lock()
			defer logMu.Unlock()
			for _, l := range logs {
				t.Logf("chromedp: %s", l)
			}
		}
	})
	// the first Run starts the browser; its context must carry no timeout
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[int](`1`)); err != nil {
		t.Fatalf("starting %s: %v", chromiumPath, err)
	}
	return ctx
}

// readPage returns what the page recorded so far.
func readPage(t *testing.T, ctx context.Context) pageState {
	t.Helper()
	tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := chromedp.Run(tctx, chromedp.Evaluate[pageState](`({got: window.got, life: window.life})`))
	if err != nil {
		t.Fatalf("reading the page's events: %v", err)
	}
	return st
}

// waitPage polls the page until cond holds, for at most within.
func waitPage(t *testing.T, ctx context.Context, within time.Duration, what string, cond func(pageState) bool) pageState {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st := readPage(t, ctx)
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("page: %s: not within %v\nproxy events %v\ndirect events %v\nproxy life %v direct life %v",
				what, within, st.Got.Proxy, st.Got.Direct, st.Life.Proxy, st.Life.Direct)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func browserCaddyfileBody(originURL, root, keepalive string) string {
	return fmt.Sprintf(`
	handle_path /proxy/* {
		sse_fanout %[1]s {
			keepalive %[3]s
			linger 1m
			drain 100ms
		}
	}
	handle /direct/* {
		reverse_proxy %[1]s {
			flush_interval -1
		}
	}
	handle {
		root * %[2]s
		file_server
	}`, originURL, root, keepalive)
}

func TestBrowserEventSource(t *testing.T) {
	leakCheck(t)
	requireChromium(t)
	o := newOrigin(t)
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(browserPage), 0o644); err != nil {
		t.Fatal(err)
	}
	cs := startCaddy(t, browserCaddyfileBody(o.URL, root, "30s"))
	base := cs.Base
	ctx := startBrowser(t)

	// The origin sees the proxy's upstream as /s and the direct stream
	// as /direct/s (handle keeps the prefix, handle_path strips it).
	const proxied, direct = "/s", "/direct/s"
	nctx, ncancel := context.WithTimeout(ctx, 20*time.Second)
	if _, err := chromedp.Run(nctx, chromedp.Navigate(base+"/")); err != nil {
		ncancel()
		t.Fatalf("loading the test page: %v", err)
	}
	ncancel()
	// open fires when the response head arrived, which the proxy sends
	// only once the client's place in the history is set
	waitPage(t, ctx, 20*time.Second, "both EventSources open", func(st pageState) bool {
		return slices.Equal(st.Life.Proxy, []string{"open"}) && slices.Equal(st.Life.Direct, []string{"open"})
	})
	o.waitOpen(t, proxied, 1, 20*time.Second)
	o.waitOpen(t, direct, 1, 20*time.Second)

	// Phase 1: the spec vectors, each block its own write, to both
	// streams.
	phase1 := []string{
		"id: 1\ndata: one\n\n",
		"data: two\n\n",                                          // no id: inherits 1
		"id: 3\nevent: custom\ndata: three\n\n",                  // typed
		": a comment\nid: 4\ndata: l1\ndata\ndata: l3\n\n",       // multi-line, an empty line in the middle
		"id: 5\ndata:  two-spaces\ndata:nospace\ndata:\ttab\n\n", // only one leading space is stripped
		"id: 6\n\n",               // id-only: dispatches nothing, sets lastEventId
		"data: after-id-only\n\n", // inherits 6
		"id:\ndata: reset\n\n",    // empty id resets lastEventId
		"data: still-reset\n\n",   // and it stays reset
		"retry: 500\nid: 10\nevent: custom\ndata: ten\n\n",
		"data: eleven\n\n",             // the type does not carry over
		"id: 12\r\ndata: crlf\r\n\r\n", // CRLF line ends
	}
	want1 := []jsEvent{
		{"message", "one", "1"},
		{"message", "two", "1"},
		{"custom", "three", "3"},
		{"message", "l1\n\nl3", "4"},
		{"message", " two-spaces\nnospace\n\ttab", "5"},
		{"message", "after-id-only", "6"},
		{"message", "reset", ""},
		{"message", "still-reset", ""},
		{"custom", "ten", "10"},
		{"message", "eleven", "10"},
		{"message", "crlf", "12"},
	}
	for _, b := range phase1 {
		o.send(proxied, b)
		o.send(direct, b)
	}
	st := waitPage(t, ctx, 20*time.Second, "phase 1 events on both EventSources", func(st pageState) bool {
		return len(st.Got.Proxy) >= len(want1) && len(st.Got.Direct) >= len(want1)
	})
	if !slices.Equal(st.Got.Direct, want1) {
		t.Fatalf("direct from the origin, the browser dispatched\n%v\nwant (by the spec)\n%v", st.Got.Direct, want1)
	}
	if !slices.Equal(st.Got.Proxy, st.Got.Direct) {
		t.Fatalf("through sse_fanout the browser dispatched\n%v\nstraight from the origin\n%v", st.Got.Proxy, st.Got.Direct)
	}

	// The direct stream has served its purpose: close it, so that only
	// the proxy's connection is left at the origin.
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := chromedp.Run(cctx, chromedp.Evaluate[chromedp.Void](`window.es.direct.close()`))
	ccancel()
	if err != nil {
		t.Fatalf("closing the direct EventSource: %v", err)
	}
	o.waitOpen(t, direct, 0, 20*time.Second)

	// Phase 2: a reload (keepalive changed) drops the browser's proxy
	// stream; meanwhile the origin sends more events into the history of
	// the same stream, which survives the reload.
	// the admin API lists the one proxied stream
	stream := func() streamView {
		all := cs.streams(t)
		if len(all) != 1 {
			t.Fatalf("admin API lists %d streams, want the one proxied stream: %+v", len(all), all)
		}
		return all[0]
	}
	s := stream()
	if s.Clients != 1 {
		t.Fatalf("stream has %d clients before the reload, want 1", s.Clients)
	}
	cs.load(t, browserCaddyfileBody(o.URL, root, "31s"))
	eventually(t, 20*time.Second, func() bool { return stream().Clients == 0 }, func() string {
		return "the reload did not end the browser's proxy stream"
	})
	phase2 := []string{
		"id: 13\ndata: thirteen\n\n",
		"data: fourteen\n\n",
		"id: 15\nevent: custom\ndata: fifteen\n\n",
	}
	want2 := []jsEvent{
		{"message", "thirteen", "13"},
		{"message", "fourteen", "13"},
		{"custom", "fifteen", "15"},
	}
	for _, b := range phase2 {
		o.send(proxied, b)
	}
	eventually(t, 20*time.Second, func() bool { return stream().Published == s.Published+uint64(len(phase2)) }, func() string {
		return "phase 2 events did not reach the stream's history"
	})
	if n := stream().Clients; n != 0 {
		t.Fatalf("the browser reconnected before the phase 2 events were in the history (%d clients): the test did not exercise resume; is the retry (500ms) honoured?", n)
	}

	// The browser reconnects by itself with Last-Event-ID: 12 and gets
	// 13, 14, 15 from the history; then a live event.
	waitPage(t, ctx, 20*time.Second, "the proxy EventSource reopened", func(st pageState) bool {
		return len(st.Life.Proxy) >= 3
	})
	if got := stream(); got.Stream != s.Stream {
		t.Fatal("the stream was replaced across the reload; its history should have survived")
	}
	o.send(proxied, "id: 16\ndata: live-after-resume\n\n")
	want3 := []jsEvent{{"message", "live-after-resume", "16"}}
	want := slices.Concat(want1, want2, want3)
	waitPage(t, ctx, 20*time.Second, "all events on the proxy EventSource", func(st pageState) bool {
		return len(st.Got.Proxy) >= len(want)
	})
	// anything late (a duplicate) would show up within this
	time.Sleep(300 * time.Millisecond)
	st = readPage(t, ctx)
	if !slices.Equal(st.Got.Proxy, want) {
		t.Fatalf("through sse_fanout across the reload the browser dispatched\n%v\nwant each event once, in order:\n%v", st.Got.Proxy, want)
	}
	if wantLife := []string{"open", "error:0", "open"}; !slices.Equal(st.Life.Proxy, wantLife) {
		t.Fatalf("proxy EventSource life %v, want %v (dropped once, reconnecting, reopened)", st.Life.Proxy, wantLife)
	}
	if wantLife := []string{"open"}; !slices.Equal(st.Life.Direct, wantLife) {
		t.Fatalf("direct EventSource life %v, want %v", st.Life.Direct, wantLife)
	}

	// The origin saw one upstream connection for the proxied stream in
	// the whole test, and the one direct connection.
	perPath := map[string]int{}
	for len(o.requests) > 0 {
		perPath[(<-o.requests).URL.RequestURI()]++
	}
	if perPath[proxied] != 1 || perPath[direct] != 1 || o.total.Load() != 2 {
		t.Fatalf("origin connections by path %v (total %d), want one for %s and one for %s", perPath, o.total.Load(), proxied, direct)
	}
}

// With assign_ids, a browser's EventSource sees the proxy's ids, of the
// form <epoch>-<sequence>, on an origin that sends none.
func TestBrowserAssignedIDs(t *testing.T) {
	leakCheck(t)
	requireChromium(t)
	o := newOrigin(t)
	root := t.TempDir()
	page := `<!doctype html><meta charset="utf-8"><script>
window.ids = [];
const es = new EventSource("/ids/s");
es.onmessage = (e) => window.ids.push(e.lastEventId + "|" + e.data);
</script>`
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte(page), 0o644); err != nil {
		t.Fatal(err)
	}
	cs := startCaddy(t, fmt.Sprintf(`
	handle_path /ids/* {
		sse_fanout %s {
			assign_ids
		}
	}
	handle {
		root * %s
		file_server
	}`, o.URL, root))
	ctx := startBrowser(t)
	nctx, ncancel := context.WithTimeout(ctx, 20*time.Second)
	if _, err := chromedp.Run(nctx, chromedp.Navigate(cs.Base+"/")); err != nil {
		ncancel()
		t.Fatalf("loading the page: %v", err)
	}
	ncancel()
	o.waitOpen(t, "/s", 1, 20*time.Second)
	for i := 1; i <= 3; i++ {
		o.send("/s", fmt.Sprintf("data: e%d\n\n", i))
	}
	var ids []string
	eventually(t, 20*time.Second, func() bool {
		tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		got, err := chromedp.Run(tctx, chromedp.Evaluate[[]string](`window.ids`))
		ids = got
		return err == nil && len(got) == 3
	}, func() string { return fmt.Sprintf("the page got %q", ids) })
	form := regexp.MustCompile(`^([0-9a-f]{16})-([0-9]+)\|e([0-9])$`)
	var epoch string
	for i, got := range ids {
		m := form.FindStringSubmatch(got)
		if m == nil || m[2] != strconv.Itoa(i+1) || m[3] != strconv.Itoa(i+1) || (epoch != "" && m[1] != epoch) {
			t.Fatalf("event %d: lastEventId|data %q, want <epoch>-%d|e%d of one epoch (all: %q)", i+1, got, i+1, i+1, ids)
		}
		epoch = m[1]
	}
}
