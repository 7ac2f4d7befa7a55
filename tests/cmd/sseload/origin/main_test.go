package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestACountedBurstIsPostedInOrder(t *testing.T) {
	const count, size = 25, 90
	var mu sync.Mutex
	var posted [][]byte
	pub := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		posted = append(posted, b)
		mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
	}))
	defer pub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	o := &origin{feed: newFeed(100), size: size, count: count, published: make(chan []byte, publishQueue)}
	go o.publish(ctx, pub.URL)
	o.generate(ctx, 1000) // returns after count events
	if got := o.feed.position(); got != count {
		t.Fatalf("made %d events, want %d", got, count)
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n := len(posted)
		mu.Unlock()
		if n == count {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(posted) != count {
		t.Fatalf("%d events posted, want %d", len(posted), count)
	}
	wire, _, _ := o.feed.collect(0, nil)
	for i, data := range posted {
		var ev struct {
			TS  int64  `json:"ts"`
			Seq uint64 `json:"seq"`
		}
		if err := json.Unmarshal(data, &ev); err != nil {
			t.Fatalf("posted %q: %v", data, err)
		}
		if ev.Seq != uint64(i+1) || ev.TS <= 0 || len(data) != size {
			t.Errorf("event %d posted as %q", i+1, data)
		}
		if !bytes.Contains(wire, append(append([]byte("data: "), data...), '\n')) {
			t.Errorf("event %d: the stream does not carry the posted data", i+1)
		}
	}
}

// readEvents reads n events of a stream, as "id,seq" strings.
func readEvents(t *testing.T, br *bufio.Reader, n int) []string {
	t.Helper()
	var out []string
	for len(out) < n {
		block := ""
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("after %v: %v", out, err)
			}
			if line == "\n" {
				break
			}
			block += line
		}
		if strings.HasPrefix(block, ":") {
			continue
		}
		var id, seq int
		var rest string
		if _, err := fmt.Sscanf(block, "id: %d\ndata: {\"ts\":%s", &id, &rest); err != nil {
			t.Fatalf("event %q: %v", block, err)
		}
		i := strings.Index(block, `"seq":`)
		fmt.Sscanf(block[i+len(`"seq":`):], "%d", &seq)
		out = append(out, fmt.Sprintf("%d,%d", id, seq))
	}
	return out
}

func stream(t *testing.T, addr, lastEventID string) *bufio.Reader {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/events", nil)
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("content type %q", resp.Header.Get("Content-Type"))
	}
	return bufio.NewReader(resp.Body)
}

func waitStreams(t *testing.T, o *origin, n int64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); o.clients.Open() < n; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d streams, want %d", o.clients.Open(), n)
		}
	}
}

func TestStreamsAndResume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	o := &origin{feed: newFeed(100), size: 80}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go o.clients.Serve(ln)
	go o.serve(ctx)
	pad := strings.Repeat("x", o.size)

	live := stream(t, ln.Addr().String(), "")
	waitStreams(t, o, 1)
	for id := uint64(1); id <= 5; id++ {
		o.make(id, pad)
	}
	if got := readEvents(t, live, 5); strings.Join(got, " ") != "1,1 2,2 3,3 4,4 5,5" {
		t.Fatalf("live stream: %v", got)
	}
	resumed := stream(t, ln.Addr().String(), "2")
	waitStreams(t, o, 2)
	o.make(6, pad)
	if got := readEvents(t, resumed, 4); strings.Join(got, " ") != "3,3 4,4 5,5 6,6" {
		t.Errorf("resumed after 2: %v", got)
	}
	if got := readEvents(t, live, 1); got[0] != "6,6" {
		t.Errorf("live stream after the resume: %v", got)
	}
}
