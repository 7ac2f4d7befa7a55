package tests

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// The demo, as the README runs it: cmd/caddy with Caddyfile.example (only
// its ports, storage and page folder changed), opened in headless
// Chromium over HTTP/2 in three tabs plus the status page. Screenshots
// of a tab and of the status page go to tests/screenshots/ (git-ignored).

// demoPorts are the demo's addresses, moved to free ports.
type demoPorts struct{ admin, http, https, origin int }

// demoCaddyfile writes Caddyfile.example with free ports, the storage in a
// temp dir and the page folder by its absolute path, checking that each
// replaced text is there, so that a change to the example fails here
// rather than testing something else.
func demoCaddyfile(t *testing.T) (path string, ports demoPorts, storage string) {
	t.Helper()
	src, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	p := freePorts(t, 4)
	ports = demoPorts{p[0], p[1], p[2], p[3]}
	demo, err := filepath.Abs("../demo")
	if err != nil {
		t.Fatal(err)
	}
	storage = t.TempDir()
	conf := string(src)
	for _, r := range []struct {
		old, new string
		n        int
	}{
		{"admin localhost:2019", fmt.Sprintf("admin 127.0.0.1:%d\n\tstorage file_system %s", ports.admin, storage), 1},
		{"http://localhost:8080", fmt.Sprintf("http://localhost:%d", ports.http), 1},
		{"https://localhost:8443", fmt.Sprintf("https://localhost:%d", ports.https), 1},
		{"127.0.0.1:8081", fmt.Sprintf("127.0.0.1:%d", ports.origin), 2},
		{"root * demo", "root * " + demo, 1},
	} {
		// comments mention the addresses too: count the config's lines only
		if got := strings.Count(uncommented(conf), r.old); got != r.n {
			t.Fatalf("Caddyfile.example has %q %d times outside comments, want %d: update this test with the example", r.old, got, r.n)
		}
		conf = strings.ReplaceAll(conf, r.old, r.new)
	}
	path = filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, ports, storage
}

// uncommented drops the comment lines of a Caddyfile.
func uncommented(src string) string {
	var b strings.Builder
	for _, line := range strings.Split(src, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// demoLeaf waits for the HTTPS site's certificate from the internal CA in
// storage, verified against that CA's root.
func demoLeaf(t *testing.T, storage string, port int) *x509.Certificate {
	t.Helper()
	var leaf *x509.Certificate
	var last error
	eventually(t, 20*time.Second, func() bool {
		pem, err := os.ReadFile(filepath.Join(storage, "pki", "authorities", "local", "root.crt"))
		if last = err; err != nil {
			return false
		}
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM(pem)
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", fmt.Sprintf("127.0.0.1:%d", port),
			&tls.Config{RootCAs: roots, ServerName: "localhost"})
		if last = err; err != nil {
			return false
		}
		defer conn.Close()
		leaf = conn.ConnectionState().PeerCertificates[0]
		return true
	}, func() string { return fmt.Sprintf("no verified TLS handshake with the demo's HTTPS site: %v", last) })
	return leaf
}

// demoTab is what a demo tab shows.
type demoTab struct {
	IDs      []string `json:"ids"`
	Clients  string   `json:"clients"`
	Origin   string   `json:"origin"`
	State    string   `json:"state"`
	Protocol string   `json:"protocol"`
}

// statusView is what the status page shows.
type statusView struct {
	Conn      string   `json:"conn"`
	Clients   string   `json:"clients"`
	Upstreams string   `json:"upstreams"`
	Fanout    string   `json:"fanout"`
	Rows      []string `json:"rows"`
	Protocol  string   `json:"protocol"`
}

func evaluate[T any](t *testing.T, ctx context.Context, js string) T {
	t.Helper()
	ectx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := chromedp.Run(ectx, chromedp.Evaluate[T](js))
	if err != nil {
		t.Fatalf("evaluating %q: %v", js, err)
	}
	return v
}

const protocolJS = `performance.getEntriesByType("navigation")[0].nextHopProtocol`

func TestBrowserDemo(t *testing.T) {
	requireChromium(t)
	conf, ports, storage := demoCaddyfile(t)
	// the example keeps Caddy's autosave of the config: in a temp HOME
	home := t.TempDir()
	p := startProcEnv(t, "caddy demo", []string{"HOME=" + home, "XDG_CONFIG_HOME=" + home, "XDG_DATA_HOME=" + home},
		caddyBinary(t), "run", "--config", conf, "--adapter", "caddyfile")
	waitListening(t, fmt.Sprintf("http://127.0.0.1:%d", ports.http))
	leaf := demoLeaf(t, storage, ports.https)
	ctx := startBrowser(t, chromedp.Flag("ignore-certificate-errors-spki-list", spkiHash(leaf)), chromedp.WindowSize(1280, 1000))
	site := fmt.Sprintf("https://localhost:%d", ports.https)

	// three tabs of the demo
	var tabs []context.Context
	for range 3 {
		tab, cancel := chromedp.NewContext(ctx)
		t.Cleanup(cancel)
		// the first Run opens the tab: its context must carry no timeout,
		// or the tab goes with it
		if _, err := chromedp.Run(tab, chromedp.Evaluate[int](`1`)); err != nil {
			t.Fatalf("opening a tab: %v", err)
		}
		navigate(t, tab, site+"/")
		tabs = append(tabs, tab)
	}
	read := func(tab context.Context) demoTab {
		return evaluate[demoTab](t, tab, `({
			ids: [...document.querySelectorAll("#events li .id")].map(e => e.textContent),
			clients: document.getElementById("clients").textContent,
			origin: document.getElementById("origin-conns").textContent,
			state: document.getElementById("state").textContent,
			protocol: `+protocolJS+`})`)
	}
	for i, tab := range tabs {
		var st demoTab
		eventually(t, 30*time.Second, func() bool {
			st = read(tab)
			return len(st.IDs) >= 3 && st.Clients == "3" && st.Origin == "1"
		}, func() string { return fmt.Sprintf("tab %d shows %+v", i+1, st) })
		if st.Protocol != "h2" || st.State != "open" {
			t.Fatalf("tab %d: page over %q, stream %q; want h2, open", i+1, st.Protocol, st.State)
		}
		prev := 0
		for _, id := range st.IDs {
			n, err := strconv.Atoi(strings.TrimPrefix(id, "#"))
			if err != nil || n <= prev {
				t.Fatalf("tab %d: event rows %v do not carry increasing ids", i+1, st.IDs)
			}
			prev = n
		}
		t.Logf("tab %d: %d rows, ids %s..%s, clients watching %s, origin connections %s, %s", i+1, len(st.IDs), st.IDs[0], st.IDs[len(st.IDs)-1], st.Clients, st.Origin, st.Protocol)
	}

	// the status page, in the browser's first tab
	navigate(t, ctx, site+"/status")
	var sv statusView
	eventually(t, 20*time.Second, func() bool {
		sv = evaluate[statusView](t, ctx, `({
			conn: document.getElementById("conn").textContent,
			clients: document.getElementById("t-clients").textContent,
			upstreams: document.getElementById("t-upstreams").textContent,
			fanout: document.getElementById("t-fanout").textContent,
			rows: [...document.querySelectorAll("#rows tr")].map(r => r.innerText),
			protocol: `+protocolJS+`})`)
		return sv.Conn == "live" && sv.Clients == "3" && sv.Upstreams == "1" && len(sv.Rows) == 1 && strings.Contains(sv.Rows[0], "live")
	}, func() string { return fmt.Sprintf("status page shows %+v", sv) })
	if sv.Fanout != "3" || sv.Protocol != "h2" || !strings.Contains(sv.Rows[0], fmt.Sprintf("http://127.0.0.1:%d", ports.origin)) {
		t.Fatalf("status page: %+v", sv)
	}
	if strings.Contains(sv.Rows[0], "/events/ticker") {
		t.Fatalf("the status page shows the stream's path: %q", sv.Rows[0])
	}
	t.Logf("status page: %+v", sv)
	// let the sparklines draw a few points, then keep screenshots
	time.Sleep(3 * time.Second)
	screenshot(t, tabs[0], "demo-tab.png")
	screenshot(t, ctx, "status.png")

	if strings.Count(p.log.String(), "origin connection opened") != 1 {
		t.Fatalf("the demo origin logged %d connections, want 1", strings.Count(p.log.String(), "origin connection opened"))
	}
}

// screenshot saves the page of ctx, whole, to tests/screenshots/name.
func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	png, err := chromedp.Run(sctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot %s: %v", name, err)
	}
	if err := os.MkdirAll("screenshots", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join("screenshots", name), png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: tests/screenshots/%s (%d bytes)", name, len(png))
}
