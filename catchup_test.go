package ssefanout

import (
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Resumes that the history cannot answer: catch-ups from the origin, ids
// for origins that send none. Through a real Caddy and a real loopback
// origin that keeps a log of its events, as origins that honour
// Last-Event-ID do.

// logOrigin is an origin with a log of numbered events (id n, data "e<n>")
// on one path. A request with Last-Event-ID n gets the events after n from
// the log, then live ones, unless it ignores Last-Event-ID; a request
// without one starts live. Requests with Last-Event-ID are the tests'
// catch-ups: catchUp, when set, answers them instead.
type logOrigin struct {
	*origin
	mu       sync.Mutex
	log      []string // log[i] is event i+1's wire form
	conns    map[chan string]bool
	ignoreID bool
	// sharedDelay holds back what the connection without Last-Event-ID
	// gets, so that a catch-up can run ahead of the shared stream.
	sharedDelay time.Duration
	catchUp     atomic.Pointer[http.HandlerFunc]

	catchUps    atomic.Int64 // catch-up requests ever
	openCatchUp atomic.Int64 // catch-up responses open now
	maxOpen     atomic.Int64
	resumedFrom chan string // Last-Event-IDs of catch-ups, in order
}

func newLogOrigin(t *testing.T) *logOrigin {
	lo := &logOrigin{origin: newOrigin(t), conns: map[chan string]bool{}, resumedFrom: make(chan string, 1000)}
	lo.setHandler(lo.serve)
	return lo
}

func (lo *logOrigin) serve(w http.ResponseWriter, r *http.Request) {
	id, resuming := r.Header["Last-Event-Id"]
	if resuming {
		lo.catchUps.Add(1)
		lo.resumedFrom <- id[0]
		n := lo.openCatchUp.Add(1)
		defer lo.openCatchUp.Add(-1)
		for m := lo.maxOpen.Load(); n > m && !lo.maxOpen.CompareAndSwap(m, n); m = lo.maxOpen.Load() {
		}
		if f := lo.catchUp.Load(); f != nil {
			(*f)(w, r)
			return
		}
	}
	lo.stream(w, r)
}

// stream answers from the log, as serve does without a catch-up handler.
func (lo *logOrigin) stream(w http.ResponseWriter, r *http.Request) {
	id, resuming := r.Header["Last-Event-Id"]
	out := make(chan string, 10000)
	lo.mu.Lock()
	var backlog []string
	if resuming && !lo.ignoreID {
		after, _ := strconv.Atoi(id[0])
		if after < len(lo.log) {
			backlog = append(backlog, lo.log[after:]...)
		}
	}
	lo.conns[out] = true
	lo.mu.Unlock()
	defer func() {
		lo.mu.Lock()
		delete(lo.conns, out)
		lo.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	for _, ev := range backlog {
		_, _ = io.WriteString(w, ev)
	}
	_ = rc.Flush()
	delay := time.Duration(0)
	if !resuming {
		delay = lo.sharedDelay
	}
	for {
		select {
		case ev := <-out:
			if delay > 0 {
				time.Sleep(delay)
			}
			if _, err := io.WriteString(w, ev); err != nil {
				return
			}
			_ = rc.Flush()
		case <-r.Context().Done():
			return
		}
	}
}

// publish appends events up to n to the log and sends them to every open
// connection.
func (lo *logOrigin) publish(n int) {
	lo.mu.Lock()
	defer lo.mu.Unlock()
	for i := len(lo.log) + 1; i <= n; i++ {
		ev := ev(i, fmt.Sprint("e", i))
		lo.log = append(lo.log, ev)
		for c := range lo.conns {
			c <- ev
		}
	}
}

// publishSteps publishes up to n in steps of 5, each read by keeper
// before the next: a burst larger than the history would drop it as
// lagging (it is no EventSource, it would not come back).
func (lo *logOrigin) publishSteps(t *testing.T, keeper *sseClient, n int) {
	t.Helper()
	lo.mu.Lock()
	from := len(lo.log) + 1
	lo.mu.Unlock()
	for i := from; i <= n; i = min(i+5, n+1) {
		to := min(i+4, n)
		lo.publish(to)
		keeper.waitFor(t, ev(to, fmt.Sprint("e", to)), 5*time.Second)
	}
}

// shared returns how many connections without Last-Event-ID are open.
func (lo *logOrigin) connections() int {
	lo.mu.Lock()
	defer lo.mu.Unlock()
	return len(lo.conns)
}

// events is the wire form of events from..to.
func events(from, to int) string {
	var b strings.Builder
	for i := from; i <= to; i++ {
		b.WriteString(ev(i, fmt.Sprint("e", i)))
	}
	return b.String()
}

func gaps() float64 {
	sum := 0.0
	for _, r := range []string{gapNotFound, gapNoSlot, gapFailed, gapUnmet, gapOriginIgnore} {
		sum += testutil.ToFloat64(metrics.resumeGaps.WithLabelValues(r))
	}
	return sum
}

// A client that read 1..5 comes back with Last-Event-ID 5 after the stream
// went on to 60 with a history of 10: the origin is asked once, from 5, and
// the client gets 6..60 and then live events, each once, in order; the
// catch-up closes after the splice.
func TestCatchUpFromOrigin(t *testing.T) {
	leakCheck(t)
	lo := newLogOrigin(t)
	base := startCaddy(t, "sse_fanout "+lo.URL+" {\n history 10\n linger 5s\n}")
	keeper := connect(t, base+"/s", nil) // keeps the stream live
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string { return "shared upstream not open" })
	a := connect(t, base+"/s", nil)
	lo.publish(5)
	a.waitFor(t, events(1, 5), 5*time.Second)
	a.close()
	lo.publishSteps(t, keeper, 60)
	catchUps := lo.catchUps.Load()

	back := connect(t, base+"/s", http.Header{"Last-Event-Id": {"5"}})
	back.waitFor(t, events(6, 60), 10*time.Second)
	lo.publish(62)
	back.waitFor(t, events(6, 62), 5*time.Second)
	if got := back.events(); got != events(6, 62) {
		t.Fatalf("resumed client got %q, want 6..62 once each, in order", truncate(got, 400))
	}
	if n := lo.catchUps.Load() - catchUps; n != 1 {
		t.Fatalf("origin saw %d catch-up requests, want 1", n)
	}
	if id := <-lo.resumedFrom; id != "5" {
		t.Fatalf("catch-up asked from %q, want 5", id)
	}
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string {
		return fmt.Sprintf("the catch-up did not close after the splice: %d origin connections", lo.connections())
	})
	if n := testutil.ToFloat64(metrics.resumes.WithLabelValues("catch_up")); n < 1 {
		t.Errorf("resumes_total{result=catch_up} is %v", n)
	}
}

// The catch-up runs ahead of the shared stream (the origin is quicker on
// it): the client switches once the shared stream publishes what it last
// got, with no duplicate and no gap.
func TestCatchUpAheadOfSharedStream(t *testing.T) {
	leakCheck(t)
	lo := newLogOrigin(t)
	base := startCaddy(t, "sse_fanout "+lo.URL+" {\n history 5\n linger 5s\n}")
	keeper := connect(t, base+"/s", nil)
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string { return "shared upstream not open" })
	lo.publishSteps(t, keeper, 20)
	lo.sharedDelay = 0 // set below, once the shared connection is caught up
	lo.mu.Lock()
	lo.sharedDelay = 300 * time.Millisecond
	lo.mu.Unlock()

	back := connect(t, base+"/s", http.Header{"Last-Event-Id": {"3"}})
	back.waitFor(t, events(4, 20), 10*time.Second)
	lo.publish(25) // the catch-up gets these 300 ms before the shared stream
	back.waitFor(t, events(4, 25), 10*time.Second)
	lo.publish(27)
	back.waitFor(t, events(4, 27), 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	if got := back.events(); got != events(4, 27) {
		t.Fatalf("resumed client got %q, want 4..27 once each, in order", truncate(got, 600))
	}
}

// 100 clients come back with the same stale id while the origin holds the
// catch-up's answer: one catch-up request serves them all.
func TestCatchUpSharedBySameID(t *testing.T) {
	leakCheck(t)
	lo := newLogOrigin(t)
	base := startCaddy(t, "sse_fanout "+lo.URL+" {\n history 5\n linger 5s\n}")
	keeper := connect(t, base+"/s", nil)
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string { return "shared upstream not open" })
	lo.publishSteps(t, keeper, 30)

	release := make(chan struct{})
	held := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		lo.stream(w, r)
	})
	lo.catchUp.Store(&held)
	const n = 100
	rt := newClientTransport()
	defer rt.CloseIdleConnections()
	var clients []*sseClient
	for range n {
		c, err := tryConnect(rt, base+"/s", http.Header{"Last-Event-Id": {"10"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.close)
		clients = append(clients, c)
	}
	s := findStream(t, "/s")
	eventually(t, 10*time.Second, func() bool {
		s.cuMu.Lock()
		defer s.cuMu.Unlock()
		cu := s.catchUps["10"]
		if cu == nil {
			return false
		}
		cu.mu.Lock()
		defer cu.mu.Unlock()
		return len(cu.readers) == n
	}, func() string { return "the 100 clients did not all join one catch-up" })
	close(release)
	for i, c := range clients {
		c.waitFor(t, events(11, 30), 10*time.Second)
		if got := c.events(); got != events(11, 30) {
			t.Fatalf("client %d got %q", i, truncate(got, 300))
		}
	}
	if got := lo.catchUps.Load(); got != 1 {
		close(lo.resumedFrom)
		var ids []string
		for id := range lo.resumedFrom {
			ids = append(ids, id)
		}
		t.Fatalf("origin saw %d catch-up requests for 100 clients with one id, want 1: from %q", got, ids)
	}
}

// 30 distinct stale ids with max_catch_ups 2: the origin never holds more
// than 2 catch-ups at once; every client either resumed exactly or started
// live, and the gap metric counts exactly those that started live.
func TestCatchUpBounds(t *testing.T) {
	leakCheck(t)
	lo := newLogOrigin(t)
	base := startCaddy(t, "sse_fanout "+lo.URL+" {\n history 5\n linger 5s\n max_catch_ups 2\n}")
	keeper := connect(t, base+"/s", nil)
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string { return "shared upstream not open" })
	lo.publishSteps(t, keeper, 100)
	gaps0 := gaps()

	const n = 30
	rt := newClientTransport()
	defer rt.CloseIdleConnections()
	clients := make([]*sseClient, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c, err := tryConnect(rt, base+"/s", http.Header{"Last-Event-Id": {strconv.Itoa(i + 1)}})
			if err != nil {
				t.Error(err)
				return
			}
			t.Cleanup(c.close)
			clients[i] = c
		})
	}
	wg.Wait()
	// wait for every client to be settled: spliced, or live
	time.Sleep(3 * time.Second)
	lo.publish(101)
	exact, live := 0, 0
	for i, c := range clients {
		if c == nil {
			t.Fatal("a client did not connect")
		}
		c.waitFor(t, ev(101, "e101"), 10*time.Second)
		switch got := c.events(); got {
		case events(i+2, 101):
			exact++
		case ev(101, "e101"), "id: 100\n\n" + ev(101, "e101"):
			live++
		default:
			t.Fatalf("client %d (Last-Event-ID %d) got neither an exact resume nor a live start: %q", i, i+1, truncate(got, 300))
		}
	}
	t.Logf("%d exact resumes, %d live starts; origin held at most %d catch-ups at once, %d in all", exact, live, lo.maxOpen.Load(), lo.catchUps.Load())
	if m := lo.maxOpen.Load(); m > 2 {
		t.Errorf("origin held %d catch-ups at once, more than max_catch_ups 2", m)
	}
	if exact == 0 {
		t.Error("no client was caught up")
	}
	if g := gaps() - gaps0; int(g) != live {
		t.Errorf("the gap metric counted %v, but %d clients started live", g, live)
	}
}

// An origin that ignores Last-Event-ID answers a catch-up from its live
// head: the client is spliced at once, with no duplicate, and the gap is
// counted.
func TestCatchUpOriginIgnoresLastEventID(t *testing.T) {
	leakCheck(t)
	lo := newLogOrigin(t)
	lo.ignoreID = true
	base := startCaddy(t, "sse_fanout "+lo.URL+" {\n history 5\n linger 5s\n}")
	keeper := connect(t, base+"/s", nil)
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string { return "shared upstream not open" })
	lo.publishSteps(t, keeper, 20)
	gaps0 := testutil.ToFloat64(metrics.resumeGaps.WithLabelValues(gapOriginIgnore))

	back := connect(t, base+"/s", http.Header{"Last-Event-Id": {"3"}})
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 2 }, func() string { return "no catch-up" })
	lo.publish(23)
	back.waitFor(t, events(21, 23), 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	if got := back.events(); got != events(21, 23) {
		t.Fatalf("client got %q, want 21..23 once each", got)
	}
	if g := testutil.ToFloat64(metrics.resumeGaps.WithLabelValues(gapOriginIgnore)) - gaps0; g != 1 {
		t.Fatalf("origin_ignored gaps: %v, want 1", g)
	}
	eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string { return "the catch-up stayed open" })
}

// Catch-ups that fail: a 500, one that hangs, one whose ids never meet the
// shared stream's. The client stays on its 200 stream, gets live events,
// and each gap is counted; everything is released.
func TestCatchUpFailures(t *testing.T) {
	leakCheck(t)
	cases := []struct {
		name    string
		handler http.HandlerFunc
		reason  string
	}{
		{"500", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", http.StatusInternalServerError) }, gapFailed},
		{"hangs", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusOK)
			http.NewResponseController(w).Flush()
			<-r.Context().Done()
		}, gapUnmet},
		{"ids never meet", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusOK)
			for i := range 3 {
				fmt.Fprintf(w, "id: other-%d\ndata: elsewhere\n\n", i)
			}
			http.NewResponseController(w).Flush()
			<-r.Context().Done()
		}, gapUnmet},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lo := newLogOrigin(t)
			base := startCaddy(t, "sse_fanout "+lo.URL+" {\n history 5\n linger off\n catch_up_timeout 1s\n}")
			keeper := connect(t, base+"/s", nil)
			eventually(t, 5*time.Second, func() bool { return lo.connections() == 1 }, func() string { return "shared upstream not open" })
			lo.publishSteps(t, keeper, 20)
			lo.catchUp.Store(&tc.handler)
			gaps0 := testutil.ToFloat64(metrics.resumeGaps.WithLabelValues(tc.reason))

			back := connect(t, base+"/s", http.Header{"Last-Event-Id": {"3"}})
			if back.resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d", back.resp.StatusCode)
			}
			eventually(t, 5*time.Second, func() bool {
				return testutil.ToFloat64(metrics.resumeGaps.WithLabelValues(tc.reason))-gaps0 == 1
			}, func() string { return "no " + tc.reason + " gap counted" })
			lo.publish(21)
			back.waitFor(t, ev(21, "e21"), 5*time.Second)
			if back.ended() {
				t.Fatal("the client's stream ended")
			}
			eventually(t, 5*time.Second, func() bool { return lo.openCatchUp.Load() == 0 }, func() string { return "the catch-up stayed open" })
			if h := findStream(t, "/s").hub; h.catchUps.Load() != 0 {
				t.Fatalf("the hub counts %d catch-ups", h.catchUps.Load())
			}
			back.close()
			keeper.close()

		})
	}
}

// max_event_size bounds the data as dispatched: exactly max_event_size
// bytes pass, one more is skipped.
func TestMaxEventSizeIsTheDataSize(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n max_event_size 1KiB\n linger off\n}")
	c := connect(t, base+"/m", nil)
	o.waitOpen(t, "/m", 1, 5*time.Second)
	exact := strings.Repeat("x", 1024)
	over := strings.Repeat("y", 1025)
	lines := strings.Repeat("a\n", 511) + "aa" // 1024 bytes over 512 lines
	o.send("/m", "data: "+exact+"\n\ndata: "+over+"\n\ndata: "+strings.ReplaceAll(lines, "\n", "\ndata: ")+"\n\ndata: after\n\n")
	c.waitFor(t, "data: after\n\n", 5*time.Second)
	want := "data: " + exact + "\n\ndata: " + strings.ReplaceAll(lines, "\n", "\ndata: ") + "\n\ndata: after\n\n"
	if got := c.events(); got != want {
		t.Fatalf("got %d bytes %q..., want the 1024-byte events and not the 1025-byte one", len(got), truncate(got, 100))
	}
}

// assign_ids: the proxy gives each event of an origin without ids an id
// `<epoch>-<seq>`; a client that drops resumes from the history with no
// gap; the origin never sees a proxy id; once the stream starts afresh
// (a new epoch), an old id starts live with a counted gap.
func TestAssignIDs(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	rec := recordRequests(t, o)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n assign_ids\n linger off\n}")
	keeper := connect(t, base+"/a", nil)
	o.waitOpen(t, "/a", 1, 5*time.Second)
	a := connect(t, base+"/a", nil)
	eventually(t, 5*time.Second, func() bool { return clientCount(findStream(t, "/a")) == 2 }, func() string { return "clients not attached" })
	o.send("/a", "data: one\n\ndata: two\n\nid: origin-9\ndata: three\n\n")
	a.waitFor(t, "data: three\n\n", 5*time.Second)
	idLine := regexp.MustCompile(`(?m)^id: ([0-9a-f]+)-([0-9]+)$`)
	got := idLine.FindAllStringSubmatch(a.events(), -1)
	if len(got) != 3 || got[0][2] != "1" || got[1][2] != "2" || got[2][2] != "3" || got[0][1] != got[2][1] {
		t.Fatalf("events carry ids %v, want <epoch>-1..3 of one epoch (the origin's own id replaced): %q", got, a.events())
	}
	epoch := got[0][1]
	if strings.Contains(a.events(), "origin-9") {
		t.Fatal("the origin's id reached a client")
	}

	// a client that dropped after event 1 resumes from the history
	resumed := connect(t, base+"/a", http.Header{"Last-Event-Id": {epoch + "-1"}})
	resumed.waitFor(t, "data: three\n\n", 5*time.Second)
	if want := "id: " + epoch + "-2\ndata: two\n\nid: " + epoch + "-3\ndata: three\n\n"; resumed.events() != want {
		t.Fatalf("resumed client got %q, want %q", resumed.events(), want)
	}
	for _, r := range rec.byPath("/a") {
		if id := r.Header.Get("Last-Event-Id"); id != "" {
			t.Fatalf("the origin was sent Last-Event-ID %q", id)
		}
	}

	// the stream starts afresh: the old id is from another life
	keeper.close()
	a.close()
	resumed.close()
	eventually(t, 5*time.Second, func() bool { return countHubStreams() == 0 }, func() string { return "stream not closed" })
	gaps0 := testutil.ToFloat64(metrics.resumeGaps.WithLabelValues(gapNotFound))
	old := connect(t, base+"/a", http.Header{"Last-Event-Id": {epoch + "-3"}})
	o.waitOpen(t, "/a", 1, 5*time.Second)
	if r := rec.byPath("/a"); len(r) != 2 || r[1].Header.Get("Last-Event-Id") != "" {
		t.Fatalf("the new stream's upstream request: %d requests, Last-Event-ID %q", len(r), r[len(r)-1].Header.Get("Last-Event-Id"))
	}
	o.send("/a", "data: four\n\n")
	old.waitFor(t, "data: four\n\n", 5*time.Second)
	got = idLine.FindAllStringSubmatch(old.events(), -1)
	if len(got) != 1 || got[0][1] == epoch || got[0][2] != "1" {
		t.Fatalf("after a restart got ids %v, want <new epoch>-1", got)
	}
	if g := testutil.ToFloat64(metrics.resumeGaps.WithLabelValues(gapNotFound)) - gaps0; g != 1 {
		t.Fatalf("not_found gaps: %v, want 1", g)
	}
}

// replay_since: a client without Last-Event-ID gets the events of the
// last stretch of time, whatever their number.
func TestReplaySince(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n replay_since 400ms\n linger 5s\n}")
	keeper := connect(t, base+"/r", nil)
	o.waitOpen(t, "/r", 1, 5*time.Second)
	o.send("/r", ev(1, "old"))
	keeper.waitFor(t, ev(1, "old"), 5*time.Second)
	time.Sleep(600 * time.Millisecond)
	o.send("/r", ev(2, "recent")+ev(3, "recent"))
	keeper.waitFor(t, ev(3, "recent"), 5*time.Second)
	late := connect(t, base+"/r", nil)
	late.waitFor(t, ev(3, "recent"), 5*time.Second)
	if got := late.events(); got != ev(2, "recent")+ev(3, "recent") {
		t.Fatalf("late joiner got %q, want the two events of the last 400ms", got)
	}
}
