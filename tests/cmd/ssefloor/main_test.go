package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// upstream serves events 1..n, one every 10ms, once the test says go.
func upstream(n int, start <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		rc.Flush()
		<-start
		for i := 1; i <= n; i++ {
			fmt.Fprintf(w, "id: %d\ndata: {\"seq\":%d}\n\n", i, i)
			rc.Flush()
			time.Sleep(10 * time.Millisecond)
		}
		<-r.Context().Done()
	})
}

func TestClientsGetEveryEventAsAChunkedStream(t *testing.T) {
	const clients, events = 5, 20
	start := make(chan struct{})
	up := httptest.NewServer(upstream(events, start))
	defer up.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := &floor{events: make(chan []byte, queueLen)}
	go f.clients.Serve(ln)
	go f.read(ctx, up.URL)
	done := make(chan struct{})
	go func() {
		f.write(ctx)
		close(done)
	}()

	var bodies []*bufio.Reader
	for range clients {
		resp, err := http.Get("http://" + ln.Addr().String() + "/any")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.Header.Get("Content-Type") != "text/event-stream" || len(resp.TransferEncoding) == 0 || resp.TransferEncoding[0] != "chunked" {
			t.Fatalf("response head: %v %v", resp.Header, resp.TransferEncoding)
		}
		bodies = append(bodies, bufio.NewReader(resp.Body))
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if f.clients.Open() == clients || time.Now().After(deadline) {
			break
		}
	}
	close(start)
	for c, br := range bodies {
		for i := 1; i <= events; i++ {
			id, err1 := br.ReadString('\n')
			data, err2 := br.ReadString('\n')
			blank, err3 := br.ReadString('\n')
			if err1 != nil || err2 != nil || err3 != nil {
				t.Fatalf("client %d, event %d: %v %v %v", c, i, err1, err2, err3)
			}
			want := fmt.Sprintf("id: %d\ndata: {\"seq\":%d}\n\n", i, i)
			if got := id + data + blank; got != want {
				t.Fatalf("client %d: got %q, want %q", c, got, want)
			}
		}
	}
	cancel()
	<-done
	if f.clients.Dropped() != 0 {
		t.Errorf("%d clients dropped", f.clients.Dropped())
	}
}
