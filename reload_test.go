package ssefanout

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Config reloads through a real Caddy: a second load of a Caddyfile is a
// reload, exactly as POST /load would do it.

// publisher sends numbered events to path every interval until stopped.
type publisher struct {
	n    atomic.Int64
	stop chan struct{}
	wg   sync.WaitGroup
}

func startPublisher(o *origin, path string, interval time.Duration) *publisher {
	p := &publisher{stop: make(chan struct{})}
	p.wg.Go(func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				i := p.n.Add(1)
				o.send(path, ev(int(i), fmt.Sprint("e", i)))
			}
		}
	})
	return p
}

func (p *publisher) halt() int {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	p.wg.Wait()
	return int(p.n.Load())
}

// wantEvents is what an EventSource records for events 1..n.
func wantEvents(from, n int) []string {
	var out []string
	for i := from; i <= n; i++ {
		out = append(out, fmt.Sprintf("%d|e%d", i, i))
	}
	return out
}

func reloadConfig(port int, upstream, opts string) string {
	return caddyfileFor(port, fmt.Sprintf("sse_fanout %s {\n%s\n}", upstream, opts))
}

// startReloadable starts Caddy with one sse_fanout handler on a port of
// its own, so that a later loadCaddyfile(reloadConfig(port, ...)) is a
// reload of the same site.
func startReloadable(t *testing.T, upstream, opts string) (port int, base string) {
	port = freePort(t)
	loadCaddyfile(t, reloadConfig(port, upstream, opts))
	t.Cleanup(func() { _ = caddy.Stop() })
	base = fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)
	return port, base
}

// attachEventSources starts n reconnecting clients of base+path and waits
// until the origin has the stream open and all n are attached to it.
func attachEventSources(t *testing.T, o *origin, base, path string, n int) []*eventSource {
	rt := newClientTransport()
	t.Cleanup(rt.CloseIdleConnections)
	var clients []*eventSource
	for range n {
		clients = append(clients, newEventSource(t, rt, base+path))
	}
	o.waitOpen(t, path, 1, 5*time.Second)
	s := findStream(t, path)
	eventually(t, 10*time.Second, func() bool { return clientCount(s) == n }, func() string {
		return fmt.Sprintf("%d of %d clients attached", clientCount(s), n)
	})
	return clients
}

// waitFirstEnds waits until every client's first stream has ended, and
// returns the earliest and the latest of those ends, counted from since.
func waitFirstEnds(t *testing.T, clients []*eventSource, since time.Time, within time.Duration) (first, last time.Duration) {
	ended := func(c *eventSource) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.ends) > 0
	}
	eventually(t, within, func() bool {
		for _, c := range clients {
			if !ended(c) {
				return false
			}
		}
		return true
	}, func() string { return fmt.Sprintf("not every client's stream ended within %v", within) })
	first = time.Duration(1 << 62)
	for _, c := range clients {
		c.mu.Lock()
		d := c.ends[0].Sub(since)
		c.mu.Unlock()
		first, last = min(first, d), max(last, d)
	}
	return first, last
}

func TestReloadKeepsStreams(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	port, base := startReloadable(t, o.URL, "keepalive 10s\nlinger 5s\ndrain 1s")
	const n = 50
	clients := attachEventSources(t, o, base, "/r", n)
	pub := startPublisher(o, "/r", 20*time.Millisecond)
	time.Sleep(300 * time.Millisecond)

	reloaded := time.Now()
	loadCaddyfile(t, reloadConfig(port, o.URL, "keepalive 11s\nlinger 5s\ndrain 1s"))
	// every client's stream ends within the drain window (plus slack) ...
	_, spread := waitFirstEnds(t, clients, reloaded, 6*time.Second)
	t.Logf("all %d streams ended within %v of the reload", n, spread.Round(time.Millisecond))
	// ... and each reconnects with its Last-Event-ID
	eventually(t, 10*time.Second, func() bool {
		for _, c := range clients {
			if _, opens := c.snapshot(); opens < 2 {
				return false
			}
		}
		return true
	}, func() string { return "not every client reconnected" })
	time.Sleep(300 * time.Millisecond)
	last := pub.halt()
	want := wantEvents(1, last)
	for i, c := range clients {
		eventually(t, 10*time.Second, func() bool {
			got, _ := c.snapshot()
			return len(got) >= len(want)
		}, func() string { return fmt.Sprintf("client %d: missing events", i) })
		got, _ := c.snapshot()
		// clients attached before the first event, so they must see all
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Fatalf("client %d: got %d events, want %d exactly once in order:\n%v", i, len(got), len(want), got)
		}
		c.mu.Lock()
		resumeID := c.sentID[1]
		c.mu.Unlock()
		if resumeID == "" {
			t.Fatalf("client %d reconnected without Last-Event-ID", i)
		}
	}
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections across the reload, want 1", got)
	}
}

func TestReloadChangedUpstream(t *testing.T) {
	leakCheck(t)
	a, b := newOrigin(t), newOrigin(t)
	port := freePort(t)
	loadCaddyfile(t, reloadConfig(port, a.URL, "linger 5s\ndrain 200ms"))
	t.Cleanup(func() { _ = caddy.Stop() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)
	rt := newClientTransport()
	defer rt.CloseIdleConnections()
	c := newEventSource(t, rt, base+"/m")
	a.waitOpen(t, "/m", 1, 5*time.Second)
	a.send("/m", ev(1, "from-a"))
	eventually(t, 5*time.Second, func() bool { got, _ := c.snapshot(); return len(got) == 1 }, func() string { return "no event from a" })

	loadCaddyfile(t, reloadConfig(port, b.URL, "linger 5s\ndrain 200ms"))
	b.waitOpen(t, "/m", 1, 10*time.Second)
	a.waitOpen(t, "/m", 0, 10*time.Second)
	if got := lastRequest(t, b, "/m").Header.Get("Last-Event-Id"); got != "1" {
		t.Fatalf("new upstream asked with Last-Event-ID %q, want 1 (the client's)", got)
	}
	b.send("/m", ev(2, "from-b"))
	eventually(t, 5*time.Second, func() bool { got, _ := c.snapshot(); return len(got) == 2 }, func() string {
		got, _ := c.snapshot()
		return fmt.Sprintf("client did not move to the new upstream: %v", got)
	})
	if got, _ := c.snapshot(); got[1] != "2|from-b" {
		t.Fatalf("got %v", got)
	}
}

func TestFailedReloadChangesNothing(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	port := freePort(t)
	good := reloadConfig(port, o.URL, "history 100\nlinger 5s")
	loadCaddyfile(t, good)
	t.Cleanup(func() { _ = caddy.Stop() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)
	c := connect(t, base+"/f", nil)
	o.waitOpen(t, "/f", 1, 5*time.Second)
	s := findStream(t, "/f")

	// same identity, other hub settings, but a second handler fails to
	// provision, so the whole config is refused
	bad := caddyfileFor(port, fmt.Sprintf(`sse_fanout /f* %s {
		history 5
		linger 5s
	}
	sse_fanout /broken* %s {
		transport http {
			versions 9
		}
	}`, o.URL, o.URL))
	if err := tryLoadCaddyfile(bad); err == nil {
		t.Fatal("a config with an unsupported HTTP version loaded")
	}
	s.mu.RLock()
	ringLen := s.hist.limit
	s.mu.RUnlock()
	if ringLen != 100 {
		t.Fatalf("failed config changed the stream's history limit to %d", ringLen)
	}
	if got := s.hub.current().settings.history; got != 100 {
		t.Fatalf("failed config changed the hub's history setting to %d", got)
	}
	o.send("/f", ev(1, "still"))
	c.waitFor(t, ev(1, "still"), 5*time.Second)
	if c.ended() || o.total.Load() != 1 || o.open("/f") != 1 {
		t.Fatalf("failed config disturbed the stream: ended=%v origin total=%d", c.ended(), o.total.Load())
	}
	// a good reload with new settings applies them once it serves
	loadCaddyfile(t, reloadConfig(port, o.URL, "history 50\nlinger 5s\ndrain 100ms"))
	connect(t, base+"/f", nil)
	eventually(t, 5*time.Second, func() bool {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.hist.limit == 50
	}, func() string { return "new history setting not applied to the surviving stream" })
}

func TestManyReloads(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	rt := newClientTransport()
	defer rt.CloseIdleConnections()
	t.Cleanup(func() { _ = caddy.Stop() })
	var clients []*eventSource
	for i := range 20 {
		loadCaddyfile(t, reloadConfig(port, o.URL, fmt.Sprintf("keepalive %ds\nlinger 5s\ndrain 50ms", 10+i)))
		if i == 0 {
			waitUp(t, base)
			for _, p := range []string{"/x", "/y"} {
				clients = append(clients, newEventSource(t, rt, base+p))
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	o.waitOpen(t, "/x", 1, 10*time.Second)
	o.waitOpen(t, "/y", 1, 10*time.Second)
	if got := o.total.Load(); got != 2 {
		t.Fatalf("origin saw %d connections over 20 reloads, want 2 (one per stream)", got)
	}
	n := 0
	hubs.Range(func(key, _ any) bool {
		n++
		if refs, _ := hubs.References(key); refs != 1 {
			t.Errorf("hub has %d references, want 1 (the final config's)", refs)
		}
		return true
	})
	if n != 1 {
		t.Fatalf("%d hubs in the pool, want 1", n)
	}
	// the clients were ended by each reload and reconnected without an id
	// (no event yet): send once both are attached to the final config, as
	// an event sent between two connections of an EventSource is missed
	// without an id to resume from
	for _, p := range []string{"/x", "/y"} {
		s := findStream(t, p)
		eventually(t, 10*time.Second, func() bool {
			if clientCount(s) != 1 {
				return false
			}
			time.Sleep(200 * time.Millisecond)
			return clientCount(s) == 1
		}, func() string { return "client not attached after the reloads" })
	}
	o.send("/x", ev(1, "x"))
	eventually(t, 10*time.Second, func() bool { got, _ := clients[0].snapshot(); return len(got) == 1 }, func() string { return "client of /x got nothing after 20 reloads" })
}

// TestTransportIsPartOfIdentity: handlers that differ only in their
// transport (say, TLS client certificates) never share streams.
func TestTransportIsPartOfIdentity(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	startCaddy(t, fmt.Sprintf(`handle /a/* {
		sse_fanout %[1]s
	}
	handle /b/* {
		sse_fanout %[1]s {
			transport http {
				dial_timeout 2s
			}
		}
	}
	handle /c/* {
		sse_fanout %[1]s
	}`, o.URL))
	n := 0
	hubs.Range(func(_, _ any) bool { n++; return true })
	if n != 2 {
		t.Fatalf("%d hubs for two distinct transports, want 2", n)
	}
}

// A reload that changes a handler's identity (here header_up, as when an
// {env.*} key rotates) makes a new hub; the old one's clients still end
// spread over `drain`, not all in the instant the old hub goes, and each
// resumes on the new hub by Last-Event-ID.
func TestIdentityChangeDrains(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	rec := recordRequests(t, o)
	port, base := startReloadable(t, o.URL, "header_up X-Key one\nlinger 5s\ndrain 2s")
	const n = 100
	clients := attachEventSources(t, o, base, "/i", n)
	o.send("/i", ev(1, "before"))
	for _, c := range clients {
		eventually(t, 5*time.Second, func() bool { got, _ := c.snapshot(); return len(got) == 1 }, func() string { return "event 1 not received" })
	}

	reloaded := time.Now()
	loadCaddyfile(t, reloadConfig(port, o.URL, "header_up X-Key two\nlinger 5s\ndrain 2s"))
	first, last := waitFirstEnds(t, clients, reloaded, 8*time.Second)
	t.Logf("the %d streams ended between %v and %v after the reload", n, first.Round(time.Millisecond), last.Round(time.Millisecond))
	if last-first < time.Second {
		t.Errorf("clients ended within %v of each other, want them spread over the 2 s drain", (last - first).Round(time.Millisecond))
	}
	// the new hub has its own upstream, asked with the clients' id
	var reqs []*http.Request
	eventually(t, 5*time.Second, func() bool {
		reqs = rec.byPath("/i")
		return len(reqs) == 2
	}, func() string {
		return fmt.Sprintf("origin saw %d requests for /i, want the old hub's and the new one's", len(reqs))
	})
	if got := reqs[1].Header.Get("X-Key"); got != "two" {
		t.Errorf("the second upstream request carried X-Key %q, want the new config's", got)
	}
	if got := reqs[1].Header.Get("Last-Event-Id"); got != "1" {
		t.Errorf("the new hub's upstream was asked with Last-Event-ID %q, want 1", got)
	}
	eventually(t, 5*time.Second, func() bool { return o.open("/i") == 1 }, func() string {
		return fmt.Sprintf("origin holds %d streams of /i, want 1", o.open("/i"))
	})
	o.send("/i", ev(2, "after"))
	for i, c := range clients {
		eventually(t, 5*time.Second, func() bool { got, _ := c.snapshot(); return len(got) == 2 }, func() string {
			got, _ := c.snapshot()
			return fmt.Sprintf("client %d: %v", i, got)
		})
		if got, _ := c.snapshot(); got[0] != "1|before" || got[1] != "2|after" {
			t.Fatalf("client %d: %v", i, got)
		}
	}
}
