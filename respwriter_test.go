package ssefanout

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// A middleware's wrapper that may change what is written.
type rewritingWriter struct{ http.ResponseWriter }

func (w rewritingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// streamWriter passes only Caddy's own wrappers that write through, and
// only an idle timeout that a deadline can give; the bound is the
// smaller of write_timeout and the idle timeout.
func TestStreamWriterPassesOnlyKnownWrappers(t *testing.T) {
	const bound = 30 * time.Second
	bottom := httptest.NewRecorder()
	idle := func(w http.ResponseWriter, d caddyhttp.IdleDeadline) *caddyhttp.IdleTimeoutWriter {
		return &caddyhttp.IdleTimeoutWriter{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}, Deadline: d}
	}
	unbuffered := caddyhttp.NewResponseRecorder(idle(bottom, caddyhttp.IdleDeadline{Timeout: time.Minute}), nil, nil)
	unbuffered.WriteHeader(http.StatusOK) // a recorder decides at the head
	buffered := caddyhttp.NewResponseRecorder(bottom, nil, func(int, http.Header) bool { return true })
	buffered.WriteHeader(http.StatusOK)
	for _, tc := range []struct {
		name      string
		w         http.ResponseWriter
		beneath   bool
		bound     time.Duration
		skipsLogs bool
	}{
		{"net/http's own", bottom, true, bound, false},
		{"server idle writer", idle(bottom, caddyhttp.IdleDeadline{Timeout: time.Minute}), true, bound, false},
		{"shorter idle timeout caps the bound", idle(bottom, caddyhttp.IdleDeadline{Timeout: 5 * time.Second}), true, 5 * time.Second, false},
		{"access log recorder over the idle writer", unbuffered, true, bound, true},
		{"plain wrapper", &caddyhttp.ResponseWriterWrapper{ResponseWriter: bottom}, true, bound, false},
		{"minimum rate", idle(bottom, caddyhttp.IdleDeadline{Timeout: time.Minute, MinRate: 1000}), false, bound, false},
		{"server write_timeout cap", idle(bottom, caddyhttp.IdleDeadline{Timeout: time.Minute, HardDeadline: time.Now().Add(time.Hour)}), false, bound, false},
		{"buffering recorder", buffered, false, bound, false},
		{"a middleware's wrapper", rewritingWriter{idle(bottom, caddyhttp.IdleDeadline{Timeout: time.Minute})}, false, bound, false},
		{"a middleware's wrapper beneath", idle(rewritingWriter{bottom}, caddyhttp.IdleDeadline{Timeout: time.Minute}), false, bound, false},
	} {
		inner, b, skipped := streamWriter(tc.w, bound)
		switch {
		case tc.beneath && inner != http.ResponseWriter(bottom):
			t.Errorf("%s: writes to %T, want net/http's own writer", tc.name, inner)
		case !tc.beneath && inner != nil:
			t.Errorf("%s: writes to %T, want the handler's writer %T", tc.name, inner, tc.w)
		case b != tc.bound:
			t.Errorf("%s: bound %v, want %v", tc.name, b, tc.bound)
		case skipped != tc.skipsLogs:
			t.Errorf("%s: skipped the access log %v, want %v", tc.name, skipped, tc.skipsLogs)
		}
	}
}

// A client served through net/http is written beneath Caddy's access log
// recorder: Caddy logs its request when the stream ends, with the head's
// bytes, and the module logs the stream's end with every byte since.
func TestNetHTTPStreamEndIsLogged(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base, logFile := startLoggedCaddy(t, "protocols h1 h2c", o.URL)
	c := connectH2(t, newH2CTransport(t), base+"/logged")
	o.waitOpen(t, "/logged", 1, 5*time.Second)
	payload := strings.Repeat("x", 1000)
	for i := 1; i <= 5; i++ {
		o.send("/logged", ev(i, payload))
	}
	c.waitFor(t, ev(5, payload), 5*time.Second)
	c.close()
	if bytes := streamEndLogged(t, logFile); bytes < 5*len(payload) {
		t.Errorf("stream ended line counts %d bytes, want at least the 5 events' %d", bytes, 5*len(payload))
	}
}

// The server's write_idle_timeout still bounds the writes of a client
// served through net/http, though they pass beneath its wrapper: an
// HTTP/2 client that stops reading is dropped after it, not after the
// module's longer write_timeout, and a reading client of the same stream
// gets every event.
func TestServerWriteIdleTimeoutBoundsNetHTTPClients(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddyWith(t, "protocols h1 h2c\n\t\ttimeouts {\n\t\t\twrite_idle 1s\n\t\t}", "sse_fanout "+o.URL+` {
		write_timeout 30s
		linger 100ms
	}`)
	reader := connectH2(t, newH2CTransport(t), base+"/stall")
	// the stalled client has a connection of its own: HTTP/2 flow control
	// is per connection too
	stalledTransport := newH2CTransport(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/stall", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := stalledTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.ProtoMajor != 2 {
		t.Fatalf("the stalled client spoke HTTP/%d, want 2", resp.ProtoMajor)
	}
	o.waitOpen(t, "/stall", 1, 5*time.Second)
	eventually(t, 5*time.Second, func() bool { return testutil.ToFloat64(metrics.clients) == 2 }, func() string {
		return fmt.Sprintf("%v clients, want 2", testutil.ToFloat64(metrics.clients))
	})
	// 6 MiB, more than the stalled client's stream window (4 MiB) takes
	payload := strings.Repeat("y", 60<<10)
	for i := 1; i <= 100; i++ {
		o.send("/stall", ev(i, payload))
	}
	start := time.Now()
	reader.waitFor(t, ev(100, payload), 10*time.Second)
	eventually(t, 5*time.Second, func() bool { return testutil.ToFloat64(metrics.clients) == 1 }, func() string {
		return fmt.Sprintf("the stalled client is still connected %v after the events (write_idle 1s, write_timeout 30s)", time.Since(start))
	})
	o.send("/stall", ev(101, "after"))
	reader.waitFor(t, ev(101, "after"), 5*time.Second)
}
