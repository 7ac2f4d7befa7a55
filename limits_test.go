package ssefanout

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A stream with no clients never keeps a new one out: one client that
// opens max_streams junk streams and leaves each of them at once used to
// hold every slot for `linger`.
func TestLingeringStreamsMakeRoom(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n max_streams 50\n linger 30s\n keepalive 1m\n}")
	rt := newClientTransport()
	defer rt.CloseIdleConnections()

	// the attack: 50 junk streams, each left after 0.3 s
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			resp, cancel, err := getWithin(rt, fmt.Sprintf("%s/junk?n=%d", base, i), true, 10*time.Second)
			if err != nil {
				t.Errorf("junk %d: %v", i, err)
				return
			}
			time.Sleep(300 * time.Millisecond)
			cancel()
			resp.Body.Close()
		})
	}
	wg.Wait()
	eventually(t, 5*time.Second, func() bool { return o.openTotal() == 50 }, func() string {
		return fmt.Sprintf("origin holds %d streams, want the 50 lingering junk ones", o.openTotal())
	})

	// the victim is served at once, and the oldest lingering stream made
	// room for it
	start := time.Now()
	victim := connect(t, base+"/victim", nil)
	if victim.resp.StatusCode != http.StatusOK || victim.resp.Header.Get("X-Origin") != "yes" {
		t.Fatalf("victim refused: %d %v", victim.resp.StatusCode, victim.resp.Header)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("victim waited %v", d)
	}
	o.waitOpen(t, "/victim", 1, 5*time.Second)
	o.send("/victim", ev(1, "served"))
	victim.waitFor(t, ev(1, "served"), 5*time.Second)
	if n := o.openTotal(); n > 50 {
		t.Errorf("origin holds %d streams, more than max_streams", n)
	}

	// streams that do have clients still count: with 50 of them held, a
	// new one is refused
	var held []*sseClient
	for i := range 49 {
		held = append(held, connect(t, fmt.Sprintf("%s/held?n=%d", base, i), nil))
	}
	eventually(t, 5*time.Second, func() bool { return o.open("/victim") == 1 && countHubStreams() == 50 }, func() string {
		return fmt.Sprintf("streams: %d", countHubStreams())
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/one-too-many", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := checkRefusal(resp); err != nil {
		t.Errorf("51st stream with clients: %v", err)
	}
	for _, c := range held {
		if c.ended() {
			t.Errorf("a stream with a client was closed to make room")
		}
	}
}

// countHubStreams returns how many streams all hubs hold.
func countHubStreams() int {
	n := 0
	hubs.Range(func(_, v any) bool {
		n += v.(*hub).streamCount()
		return true
	})
	return n
}

// An empty stream costs little whatever `history` is: the ring grows with
// what it holds. 1,000 streams with history 100000 used to cost 5.6 MB each.
func TestEmptyStreamsCostLittle(t *testing.T) {
	set := hubSettings{history: 100000, historyBytes: 64 << 20, maxEventSize: 1 << 20, linger: time.Minute, maxStreams: -1}
	h := newHub(nil, nil, nil, &hubConfig{settings: set})
	defer h.Destruct()
	before := heapInuse()
	streams := make([]*stream, 0, 1000)
	for i := range 1000 {
		streams = append(streams, newStream(h, fmt.Sprint(i), nil, nil, "", set))
	}
	after := heapInuse()
	perStream := (int64(after) - int64(before)) / 1000
	t.Logf("heap per empty stream with history 100000: %d bytes", perStream)
	if perStream > 2048 {
		t.Errorf("an empty stream holds %d bytes of heap, want at most 2 KiB", perStream)
	}
	// and the ring still grows to what it is asked to hold
	s := streams[0]
	for i := range 5000 {
		s.append(framedEntry(entryEvent, []byte("data: x\n\n"), entry{id: fmt.Sprint(i), setsID: true, hasID: true}))
	}
	s.mu.RLock()
	count := s.hist.count
	s.mu.RUnlock()
	if count != 5000 {
		t.Errorf("history holds %d entries after 5000 publishes, want 5000", count)
	}
}

// Through a real Caddy: 200 streams with history 100000 whose origin sends
// nothing take the memory of their connections, not of their rings. The
// origin and the clients here hold no more than their sockets, so what
// grows is the proxy's side of each connection and the stream.
func TestEmptyStreamsCostLittleEndToEnd(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	var open atomic.Int64
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		open.Add(1)
		defer open.Add(-1)
		<-r.Context().Done()
	})
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n history 100000\n history_bytes 64MiB\n linger off\n keepalive 1m\n}")
	// one stream first, so that what every stream shares is in the baseline
	dialStuck(t, base, "/warm")
	eventually(t, 5*time.Second, func() bool { return open.Load() == 1 }, func() string { return "first stream not open" })
	before := heapInuse()
	const n = 200
	for i := range n {
		dialStuck(t, base, fmt.Sprintf("/e%d", i))
	}
	eventually(t, 10*time.Second, func() bool { return open.Load() == n+1 }, func() string {
		return fmt.Sprintf("origin holds %d streams, want %d", open.Load(), n+1)
	})
	after := heapInuse()
	perStream := (int64(after) - int64(before)) / n
	t.Logf("heap per empty stream, with the proxy's client and upstream connections and the origin's side: %d KiB", perStream>>10)
	if perStream > 96<<10 {
		t.Errorf("an empty stream costs %d KiB of heap, want at most 96 KiB (its ring must not be allocated up front)", perStream>>10)
	}
}

func TestLongLastEventID(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	rec := recordRequests(t, o)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger 100ms\n}")

	atLimit := strings.Repeat("A", maxLastEventIDLen) // 1 KiB: honoured
	over := strings.Repeat("B", maxLastEventIDLen+1)  // longer: treated as absent
	a := connect(t, base+"/l", nil)
	o.waitOpen(t, "/l", 1, 5*time.Second)
	evAt := "id: " + atLimit + "\ndata: at-limit\n\n"
	evOver := "id: " + over + "\ndata: over-limit\n\n"
	o.send("/l", ev(1, "m1")+evAt+evOver+ev(4, "m4"))
	a.waitFor(t, ev(4, "m4"), 5*time.Second)
	if got, want := a.events(), ev(1, "m1")+evAt+evOver+ev(4, "m4"); got != want {
		t.Fatalf("first client got %q, want %q", truncate(got, 300), truncate(want, 300))
	}

	// control: an id of exactly 1 KiB resumes from the history
	ctl := connect(t, base+"/l", http.Header{"Last-Event-Id": {atLimit}})
	ctl.waitFor(t, evOver+ev(4, "m4"), 5*time.Second)

	// longer than 1 KiB: treated as absent, even though it is in the
	// history; the client starts live with the committed id
	long := connect(t, base+"/l", http.Header{"Last-Event-Id": {over}})
	longQ := connect(t, base+"/l?lastEventId="+over, nil)
	unknown := connect(t, base+"/l", http.Header{"Last-Event-Id": {strings.Repeat("z", 4096)}})
	for _, c := range []*sseClient{long, longQ, unknown} {
		c.waitFor(t, "id: 4\n\n", 5*time.Second)
	}
	o.send("/l", ev(5, "m5"))
	for i, c := range []*sseClient{long, longQ, unknown} {
		c.waitFor(t, ev(5, "m5"), 5*time.Second)
		if got, want := c.events(), "id: 4\n\n"+ev(5, "m5"); got != want {
			t.Fatalf("client %d with a Last-Event-ID over 1KiB got %q, want %q (live start, no history)", i, truncate(got, 300), want)
		}
	}
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections, want 1", got)
	}

	// a cold stream created with an over-long id does not pass it upstream
	cold := connect(t, base+"/cold", http.Header{"Last-Event-Id": {over}})
	o.waitOpen(t, "/cold", 1, 5*time.Second)
	eventually(t, 5*time.Second, func() bool { return len(rec.byPath("/cold")) == 1 }, func() string { return "no request for /cold recorded" })
	if got := rec.byPath("/cold")[0].Header.Values("Last-Event-Id"); len(got) != 0 {
		t.Fatalf("an over-long Last-Event-ID reached the origin (%d values, first %d bytes)", len(got), len(got[0]))
	}
	o.send("/cold", "data: cold\n\n")
	cold.waitFor(t, "data: cold\n\n", 5*time.Second)
	if got := cold.events(); got != "data: cold\n\n" {
		t.Fatalf("cold client got %q, want a plain event with no inherited id", truncate(got, 300))
	}
}

func TestManyQueryStrings(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n max_streams 50\n linger 1m\n keepalive 1m\n}")

	tr := &http.Transport{
		DisableCompression:  true,
		MaxIdleConnsPerHost: 16,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}
	defer tr.CloseIdleConnections()

	var maxOpen atomic.Int64
	sampleStop := make(chan struct{})
	sampleDone := make(chan struct{})
	go func() {
		defer close(sampleDone)
		for {
			if v := int64(o.openTotal()); v > maxOpen.Load() {
				maxOpen.Store(v)
			}
			select {
			case <-sampleStop:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()

	const total, workers = 10000, 4
	start := time.Now()
	jobs := make(chan int)
	var accepted, refusedES, refused503 atomic.Int64
	var failed atomic.Int64
	var firstErr atomic.Pointer[string]
	fail := func(msg string) {
		failed.Add(1)
		firstErr.CompareAndSwap(nil, &msg)
	}
	var heldMu sync.Mutex
	var held []func()
	defer func() {
		for _, release := range held {
			release()
		}
	}()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range jobs {
				// every tenth request is not an EventSource's
				accept := i%10 != 9
				resp, cancel, err := getWithin(tr, fmt.Sprintf("%s/q?n=%d", base, i), accept, time.Minute)
				if err != nil {
					fail(fmt.Sprintf("request %d: %v", i, err))
					continue
				}
				switch {
				case resp.Header.Get("X-Origin") == "yes":
					// accepted: a live stream, held to the end, so that
					// its stream keeps its slot (a stream whose clients
					// all left would make room for a new one)
					accepted.Add(1)
					if resp.StatusCode != 200 {
						fail(fmt.Sprintf("request %d accepted with status %d", i, resp.StatusCode))
					}
					heldMu.Lock()
					held = append(held, func() { cancel(); resp.Body.Close() })
					heldMu.Unlock()
					continue
				case accept:
					refusedES.Add(1)
					if err := checkRefusal(resp); err != nil {
						fail(fmt.Sprintf("request %d: %v", i, err))
					}
				default:
					refused503.Add(1)
					if err := check503(resp); err != nil {
						fail(fmt.Sprintf("request %d: %v", i, err))
					}
				}
				cancel()
			}
		})
	}
	for i := range total {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	close(sampleStop)
	<-sampleDone
	t.Logf("%d requests with distinct queries in %v: %d accepted, %d refused with retry:, %d refused with 503; origin: %d connections, at most %d open at once",
		total, time.Since(start).Round(time.Millisecond), accepted.Load(), refusedES.Load(), refused503.Load(), o.total.Load(), maxOpen.Load())
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d requests failed, first: %s", n, *firstErr.Load())
	}
	if got := maxOpen.Load(); got > 50 {
		t.Fatalf("origin had %d connections open at once, want at most max_streams (50)", got)
	}
	if got := o.total.Load(); got > 50 {
		t.Fatalf("origin saw %d connections in all, want at most 50 (no stream with clients closes)", got)
	}
	if got := accepted.Load(); got != 50 {
		t.Fatalf("%d requests were accepted, want exactly max_streams (50)", got)
	}
	if refusedES.Load() == 0 || refused503.Load() == 0 {
		t.Fatalf("both kinds of refusal should have been seen")
	}
	// a request for an existing stream is still served
	c := connect(t, base+"/q?n=0", nil)
	if c.resp.Header.Get("X-Origin") != "yes" {
		t.Fatalf("a client of an existing stream was refused at max_streams: %v", c.resp.Header)
	}
}

func TestMaxClients(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n max_clients 3\n linger 100ms\n keepalive 1m\n}")

	var cs []*sseClient
	for range 3 {
		cs = append(cs, connect(t, base+"/m", nil))
	}
	o.waitOpen(t, "/m", 1, 5*time.Second)
	o.send("/m", ev(1, "one"))

	resp, cancel, err := getWithin(sharedTransport, base+"/m", true, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkRefusal(resp); err != nil {
		t.Fatalf("4th EventSource client: %v", err)
	}
	cancel()
	resp, cancel, err = getWithin(sharedTransport, base+"/m", false, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := check503(resp); err != nil {
		t.Fatalf("4th plain client: %v", err)
	}
	cancel()

	o.send("/m", ev(2, "two"))
	for i, c := range cs {
		c.waitFor(t, ev(2, "two"), 5*time.Second)
		if got := c.events(); got != ev(1, "one")+ev(2, "two") || c.ended() {
			t.Fatalf("existing client %d: got %q (ended %v)", i, got, c.ended())
		}
	}
	// a freed place is taken again
	s := findStream(t, "/m")
	cs[0].close()
	eventually(t, 5*time.Second, func() bool { return clientCount(s) == 2 }, func() string { return "client did not detach" })
	again := connect(t, base+"/m", nil)
	if again.resp.Header.Get("X-Origin") != "yes" {
		t.Fatalf("client refused after a place was freed: %v", again.resp.Header)
	}
	again.waitFor(t, "id: 2\n\n", 5*time.Second)
	if got := o.total.Load(); got != 1 {
		t.Fatalf("origin saw %d connections, want 1", got)
	}
}
