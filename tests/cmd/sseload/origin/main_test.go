package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
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
	o := &origin{feed: newFeed(100), size: size, count: count, published: make(chan []byte, publishQueue), done: ctx.Done()}
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
