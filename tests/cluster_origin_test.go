package tests

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// eventOrigin is an origin with a log of numbered events (id n, data
// "e<n>") on any path: a request with Last-Event-ID n gets the events after
// n from the log, then live ones, unless ignoreID; it counts connections.
type eventOrigin struct {
	URL      string
	mu       sync.Mutex
	log      []string
	conns    map[chan string]bool
	ignoreID atomic.Bool
	status   atomic.Int32 // when set, every request gets this status

	total   atomic.Int64
	lastIDs chan string // the Last-Event-ID of every request ("" for none)
}

func newEventOrigin(t testing.TB) *eventOrigin {
	t.Helper()
	o := &eventOrigin{conns: map[chan string]bool{}, lastIDs: make(chan string, 10000)}
	o.URL = serveLoopback(t, o.serve)
	return o
}

func (o *eventOrigin) serve(w http.ResponseWriter, r *http.Request) {
	o.total.Add(1)
	id := r.Header.Get("Last-Event-Id")
	select {
	case o.lastIDs <- id:
	default:
	}
	if st := o.status.Load(); st != 0 {
		w.WriteHeader(int(st))
		if st != http.StatusNoContent {
			_, _ = io.WriteString(w, "answered "+strconv.Itoa(int(st)))
		}
		return
	}
	out := make(chan string, 100000)
	o.mu.Lock()
	var backlog []string
	if after, err := strconv.Atoi(id); err == nil && !o.ignoreID.Load() && after < len(o.log) {
		backlog = append(backlog, o.log[after:]...)
	}
	o.conns[out] = true
	o.mu.Unlock()
	defer func() {
		o.mu.Lock()
		delete(o.conns, out)
		o.mu.Unlock()
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	for _, ev := range backlog {
		_, _ = io.WriteString(w, ev)
	}
	_ = rc.Flush()
	for {
		select {
		case ev := <-out:
			if _, err := io.WriteString(w, ev); err != nil {
				return
			}
			_ = rc.Flush()
		case <-r.Context().Done():
			return
		}
	}
}

// publish appends the next event and sends it to every open connection;
// it returns its number.
func (o *eventOrigin) publish() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := len(o.log) + 1
	ev := fmt.Sprintf("id: %d\ndata: e%d\n\n", n, n)
	o.log = append(o.log, ev)
	for c := range o.conns {
		c <- ev
	}
	return n
}

// open returns how many event streams the origin is serving.
func (o *eventOrigin) open() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.conns)
}

// ticker publishes an event every interval until stopped.
type ticker struct {
	stop chan struct{}
	done chan struct{}
	last atomic.Int64
}

func (o *eventOrigin) tick(interval time.Duration) *ticker {
	tk := &ticker{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(tk.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-tk.stop:
				return
			case <-t.C:
				tk.last.Store(int64(o.publish()))
			}
		}
	}()
	return tk
}

func (tk *ticker) halt() int {
	select {
	case <-tk.stop:
	default:
		close(tk.stop)
	}
	<-tk.done
	return int(tk.last.Load())
}

// esClient is an EventSource-like test client: it records every event
// ("id|data"), when each arrived, and its last id, and can reconnect to
// any node with Last-Event-ID.
type esClient struct {
	mu     sync.Mutex
	events []string
	times  []time.Time
	lastID string
	cancel context.CancelFunc
	done   chan struct{}
	status int
	body   string // a non-200 answer's body
}

// follow connects to url, with the client's last id if it has one, and
// reads until the stream ends or the client moves.
func (c *esClient) follow(t testing.TB, url string) {
	t.Helper()
	if err := c.connect(url); err != nil {
		t.Fatal(err)
	}
}

// connect is follow for other goroutines than the test's.
func (c *esClient) connect(url string) error {
	c.close()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("Accept", "text/event-stream")
	c.mu.Lock()
	if c.lastID != "" {
		req.Header.Set("Last-Event-ID", c.lastID)
	}
	c.cancel, c.done = cancel, make(chan struct{})
	done := c.done
	c.mu.Unlock()
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		cancel()
		close(done)
		return fmt.Errorf("connecting to %s: %v", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		// the status and the body are seen together: a test that waits
		// for the status reads the body next
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		c.mu.Lock()
		c.status, c.body = resp.StatusCode, string(b)
		c.mu.Unlock()
		cancel()
		close(done)
		return nil
	}
	c.mu.Lock()
	c.status = resp.StatusCode
	c.mu.Unlock()
	go func() {
		defer close(done)
		defer resp.Body.Close()
		r := bufio.NewReader(resp.Body)
		id, data := c.lastID, []string(nil)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			line = strings.TrimSuffix(line, "\n")
			switch {
			case line == "":
				c.mu.Lock()
				c.lastID = id
				if data != nil {
					c.events = append(c.events, id+"|"+strings.Join(data, "\n"))
					c.times = append(c.times, time.Now())
				}
				c.mu.Unlock()
				data = nil
			case strings.HasPrefix(line, "id:"):
				id = strings.TrimPrefix(strings.TrimPrefix(line, "id:"), " ")
			case strings.HasPrefix(line, "data:"):
				data = append(data, strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " "))
			}
		}
	}()
	return nil
}

func (c *esClient) close() {
	c.mu.Lock()
	cancel, done := c.cancel, c.done
	c.cancel = nil
	c.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

func (c *esClient) snapshot() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.events...)
}

// waitEvent waits until the client has event n.
func (c *esClient) waitEvent(t testing.TB, n int, within time.Duration) {
	t.Helper()
	want := fmt.Sprintf("%d|e%d", n, n)
	eventually(t, within, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return contains(c.events, want)
	}, func() string {
		return fmt.Sprintf("client did not get event %d within %v: %v", n, within, tailList(c.snapshot(), 5))
	})
}

func contains(l []string, s string) bool {
	for _, v := range l {
		if v == s {
			return true
		}
	}
	return false
}

func tailList(l []string, n int) []string {
	if len(l) <= n {
		return l
	}
	return l[len(l)-n:]
}

// checkExact fails unless the client got events from..to exactly once,
// in order.
func (c *esClient) checkExact(t testing.TB, name string, from, to int) {
	t.Helper()
	got := c.snapshot()
	if len(got) != to-from+1 {
		t.Fatalf("%s got %d events, want %d..%d once each: first %v last %v", name, len(got), from, to, got[:min(3, len(got))], tailList(got, 3))
	}
	for i, g := range got {
		if want := fmt.Sprintf("%d|e%d", from+i, from+i); g != want {
			t.Fatalf("%s: event %d is %q, want %q (a gap or a duplicate)", name, i, g, want)
		}
	}
}

// maxPause returns the longest time between two events the client got,
// and when it began.
func (c *esClient) maxPause() (m time.Duration, from time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := 1; i < len(c.times); i++ {
		if d := c.times[i].Sub(c.times[i-1]); d > m {
			m, from = d, c.times[i-1]
		}
	}
	return m, from
}
