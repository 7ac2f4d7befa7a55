package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/sse-fanout/caddy-sse-fanout"
)

// What the end-to-end tests of this module share: a real Caddy with
// sse_fanout loaded in this process (with its admin API, through which the
// tests see streams and metrics), a real origin on loopback, and the leak
// check. The module's state is seen only from outside.

// modulePath is the import path of the plugin, as stack traces name its
// functions.
const modulePath = "github.com/sse-fanout/caddy-sse-fanout"

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	return freePorts(t, 1)[0]
}

// freePorts returns n distinct loopback ports that were free a moment ago:
// each is held until all are found, since the kernel may hand a port
// that was just let go to the next asker.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("finding a free port: %v", err)
		}
		defer l.Close()
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports
}

// caddyServer is a Caddy running in this process.
type caddyServer struct {
	port, adminPort int
	// Base is the site's URL, Admin the admin API's.
	Base, Admin string
}

// startCaddy loads a Caddyfile whose site serves body on a fresh port, with
// the admin API on another; at test cleanup it first lets the module's
// gauges return to zero (see checkGauges), then stops Caddy.
func startCaddy(t testing.TB, body string) *caddyServer {
	t.Helper()
	p := freePorts(t, 2)
	c := &caddyServer{port: p[0], adminPort: p[1]}
	c.Base = fmt.Sprintf("http://127.0.0.1:%d", c.port)
	c.Admin = fmt.Sprintf("http://127.0.0.1:%d", c.adminPort)
	c.load(t, body)
	t.Cleanup(func() {
		c.checkGauges(t)
		_ = caddy.Stop()
	})
	waitListening(t, c.Base)
	return c
}

// config is the whole Caddyfile for body.
func (c *caddyServer) config(body string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	auto_https off
	persist_config off
	grace_period 2s
}
http://127.0.0.1:%d {
	bind 127.0.0.1
	%s
}
`, c.adminPort, c.port, body)
}

// load adapts and loads body as the site, replacing the running config (a
// reload when one is running).
func (c *caddyServer) load(t testing.TB, body string) {
	t.Helper()
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	cfg, _, err := adapter.Adapt([]byte(c.config(body)), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting the Caddyfile: %v\n%s", err, body)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading the Caddyfile: %v\n%s", err, body)
	}
}

// checkGauges replaces the config with one whose only sse_fanout handler
// serves nothing, so that every hub of the tested config goes away, and
// waits until the module's gauges (streams, clients, upstream connections)
// read zero in the admin API's metrics.
func (c *caddyServer) checkGauges(t testing.TB) {
	t.Helper()
	c.load(t, `handle /never-requested {
		sse_fanout http://127.0.0.1:9
	}`)
	c.waitGaugesZero(t)
}

// waitGaugesZero waits until the module's gauges (streams, clients,
// upstream connections) read zero in the admin API's metrics.
func (c *caddyServer) waitGaugesZero(t testing.TB) {
	t.Helper()
	names := []string{"caddy_sse_fanout_streams", "caddy_sse_fanout_clients", "caddy_sse_fanout_direct_clients", "caddy_sse_fanout_upstream_connections"}
	deadline := time.Now().Add(10 * time.Second)
	for {
		vals, err := c.metrics(names...)
		zero := err == nil
		for _, v := range vals {
			zero = zero && v == 0
		}
		if zero {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("the module's gauges did not return to zero after the test: %v %v", vals, err)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// metrics reads metrics from the admin API's /metrics, each summed over
// its labels.
func (c *caddyServer) metrics(names ...string) (map[string]float64, error) {
	resp, err := http.Get(c.Admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for line := range strings.SplitSeq(string(body), "\n") {
		for _, name := range names {
			rest, ok := strings.CutPrefix(line, name)
			if !ok || (rest[0] != ' ' && rest[0] != '{') {
				continue
			}
			// a labelled series: summed over its labels
			v := rest[strings.LastIndexByte(rest, ' ')+1:]
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return nil, fmt.Errorf("metric %s: %v", name, err)
			}
			out[name] += f
		}
	}
	for _, name := range names {
		if _, ok := out[name]; !ok {
			return nil, fmt.Errorf("metric %s missing", name)
		}
	}
	return out, nil
}

// streamView is one stream in the admin API's view.
type streamView struct {
	Stream        string `json:"stream"`
	State         string `json:"state"`
	Clients       int    `json:"clients"`
	Published     uint64 `json:"published"`
	ClusterRole   string `json:"cluster_role"`
	ClusterHolder string `json:"cluster_holder"`
}

// streams returns every stream the admin API lists.
func (c *caddyServer) streams(t testing.TB) []streamView {
	t.Helper()
	resp, err := http.Get(c.Admin + "/sse_fanout/streams")
	if err != nil {
		t.Fatalf("admin API: %v", err)
	}
	defer resp.Body.Close()
	var hubs []struct {
		Streams []streamView `json:"streams"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&hubs); err != nil {
		t.Fatalf("admin API: %v", err)
	}
	var out []streamView
	for _, h := range hubs {
		out = append(out, h.Streams...)
	}
	return out
}

// waitListening waits until something answers on base.
func waitListening(t testing.TB, base string) {
	t.Helper()
	addr := strings.TrimPrefix(base, "http://")
	eventually(t, 10*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, func() string { return "caddy did not start listening on " + base })
}

// eventually polls cond until it holds or within passes.
func eventually(t testing.TB, within time.Duration, cond func() bool, msg func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(msg())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// origin is a real SSE origin on loopback whose events the test controls:
// send writes raw bytes to every open stream of a path.
type origin struct {
	URL      string
	mu       sync.Mutex
	subs     map[string]map[chan []byte]bool
	total    atomic.Int64 // requests ever
	requests chan *http.Request
}

// newOrigin starts an origin on a free port; it stops at test cleanup.
func newOrigin(t testing.TB) *origin {
	t.Helper()
	o := &origin{subs: map[string]map[chan []byte]bool{}, requests: make(chan *http.Request, 1024)}
	o.URL = serveLoopback(t, o.serve)
	return o
}

// serveLoopback serves handler on a free loopback port until the test's
// cleanup, and returns its base URL.
func serveLoopback(t testing.TB, handler http.HandlerFunc) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: handler}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
	return "http://" + ln.Addr().String()
}

func (o *origin) serve(w http.ResponseWriter, r *http.Request) {
	o.total.Add(1)
	select {
	case o.requests <- r.Clone(context.Background()):
	default:
	}
	path := r.URL.RequestURI()
	out := make(chan []byte, 1024)
	o.mu.Lock()
	if o.subs[path] == nil {
		o.subs[path] = map[chan []byte]bool{}
	}
	o.subs[path][out] = true
	o.mu.Unlock()
	defer func() {
		o.mu.Lock()
		delete(o.subs[path], out)
		o.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	for {
		select {
		case b := <-out:
			if _, err := w.Write(b); err != nil {
				return
			}
			_ = rc.Flush()
		case <-r.Context().Done():
			return
		}
	}
}

// send writes raw bytes to every open stream of path (the request URI).
func (o *origin) send(path, raw string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for c := range o.subs[path] {
		c <- []byte(raw)
	}
}

// open returns how many streams of path are open.
func (o *origin) open(path string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.subs[path])
}

// waitOpen waits until path has n open streams.
func (o *origin) waitOpen(t testing.TB, path string, n int, within time.Duration) {
	t.Helper()
	eventually(t, within, func() bool { return o.open(path) == n }, func() string {
		return fmt.Sprintf("origin streams open on %s: got %d, want %d", path, o.open(path), n)
	})
}

// moduleGoroutines counts the goroutines running the plugin's code: those
// with a frame of a function of its import path (not of this module's).
func moduleGoroutines() (int, string) {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	var sample string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		for line := range strings.SplitSeq(g, "\n") {
			if strings.HasPrefix(line, modulePath+".") {
				n++
				if sample == "" {
					sample = g
				}
				break
			}
		}
	}
	return n, sample
}

// leakCheck fails the test unless the plugin's goroutines are gone within
// 10 s after the test's other cleanups (Caddy stopped, clients closed):
// call it first in a test.
func leakCheck(t *testing.T) {
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			n, sample := moduleGoroutines()
			if n == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d goroutines of the plugin still running, e.g.:\n%s", n, sample)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}
