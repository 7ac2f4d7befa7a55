package ssefanout

import (
	"context"
	"fmt"
	"net/http"
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
	h := newHub(nil, nil, nil, nil, set, nil)
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
		s.publish(entryEvent, []byte("data: x\n\n"), fmt.Sprint(i), true, true)
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
