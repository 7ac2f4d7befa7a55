package ssefanout

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// An origin that sends one event with a `retry:` and closes, each time.
func retryingOrigin(t *testing.T, retry string) (*origin, *atomic.Int64) {
	o := newOrigin(t)
	var conns atomic.Int64
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		n := conns.Add(1)
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, "retry: "+retry+"\nid: "+strconv.FormatInt(n, 10)+"\ndata: once\n\n")
	})
	return o, &conns
}

// A huge `retry:` is clamped for the proxy's own reconnects (it used to
// overflow into a negative delay and reconnect every 100 ms), and passed
// on to clients as the origin sent it.
func TestHugeOriginRetry(t *testing.T) {
	leakCheck(t)
	o, conns := retryingOrigin(t, "10000000000000")
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger off\n}")
	c := connect(t, base+"/r", nil)
	c.waitFor(t, "data: once\n\n", 5*time.Second)
	time.Sleep(2 * time.Second)
	if n := conns.Load(); n != 1 {
		t.Fatalf("origin asking for retry 10000000000000 ms was reconnected %d times in 2 s", n)
	}
	if !strings.Contains(c.bytes(), "retry: 10000000000000\n") {
		t.Fatalf("client did not get the origin's retry unchanged: %q", c.bytes())
	}
}

// `retry: 0` is a value, not "no retry sent": the upstream reconnects at
// once (never faster than 100 ms) and clients that join are told 0.
func TestOriginRetryZero(t *testing.T) {
	leakCheck(t)
	o, conns := retryingOrigin(t, "0")
	base := startCaddy(t, "sse_fanout "+o.URL+" {\n linger off\n}")
	first := connect(t, base+"/z", nil)
	first.waitFor(t, "data: once\n\n", 5*time.Second)
	time.Sleep(1500 * time.Millisecond)
	if n := conns.Load(); n < 4 {
		t.Fatalf("origin asking for retry 0 was reconnected %d times in 1.5 s, want about one per 100 ms", n)
	}
	if n := conns.Load(); n > 20 {
		t.Fatalf("origin reconnected %d times in 1.5 s: faster than the 100 ms floor", n)
	}
	late := connect(t, base+"/z", nil)
	late.waitFor(t, "data: once\n\n", 5*time.Second)
	if !strings.HasPrefix(late.bytes(), "retry: 0\n") {
		t.Fatalf("a client that joined was not told retry 0: %q", truncate(late.bytes(), 200))
	}
	// the admin view tells a retry of 0 from none sent
	rec := httptest.NewRecorder()
	if err := (adminStreams{}).serve(rec, httptest.NewRequest(http.MethodGet, "/sse_fanout/streams", nil)); err != nil {
		t.Fatal(err)
	}
	var view []hubStatus
	if err := json.Unmarshal(rec.Body.Bytes(), &view); err != nil || len(view) != 1 || len(view[0].Streams) != 1 {
		t.Fatalf("admin view %s: %v", rec.Body.String(), err)
	}
	if r := view[0].Streams[0].RetryMillis; r == nil || *r != 0 {
		t.Fatalf("admin view shows origin_retry_ms %v for an origin's retry: 0, want 0: %s", r, rec.Body.String())
	}
}
