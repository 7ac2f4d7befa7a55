package ssefanout

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Hostile and broken origins: oversized events, silence, garbage,
// flapping. Each is contained: bounded memory, the stream stays up for its
// clients, other streams carry on. Through a real Caddy, a real loopback
// origin and real sockets.

func TestOversizedEvent(t *testing.T) {
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

func TestSilentOrigin(t *testing.T) {
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

func TestUpstreamIdleTimeout(t *testing.T) {
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

func TestGarbageOrigin(t *testing.T) {
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

func TestFlappingOrigin(t *testing.T) {
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

// While the origin is unreachable, a client gets its 200, headers and a
// first comment at once, not an empty body until the first keepalive
// (15 s by default).
func TestFirstCommentWhileOriginDown(t *testing.T) {
	leakCheck(t)
	down := freePort(t)
	base := startCaddy(t, fmt.Sprintf("sse_fanout http://127.0.0.1:%d {\n status_wait 200ms\n linger off\n}", down))
	start := time.Now()
	c := connect(t, base+"/down", nil)
	if c.resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", c.resp.StatusCode)
	}
	eventually(t, 3*time.Second, func() bool { return strings.HasPrefix(c.bytes(), ":") }, func() string {
		return fmt.Sprintf("no comment within 3 s of connecting to a stream whose origin is down; got %q", c.bytes())
	})
	t.Logf("first comment after %v", time.Since(start).Round(time.Millisecond))
}
