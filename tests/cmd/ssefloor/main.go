// Command ssefloor is the write floor of an SSE fan-out: the least work a
// proxy can do per client per event. It reads one event stream from an
// origin and, for each event, makes one non-blocking write(2) of the event,
// framed once as an HTTP/1.1 chunk, to every client socket in a tight loop
// from one goroutine: no goroutine, buffer or flush per client.
//
//	go run ./cmd/ssefloor -listen 127.0.0.1:8090 -upstream http://127.0.0.1:9000/events
//
// Each client connection gets an HTTP/1.1 200 text/event-stream chunked
// response head whatever it asked for (its request head is read and
// discarded), then the events from the one it joined at on. The payload is
// the origin's event as it came (id and data lines), so that sseload
// measures it as it measures a proxy.
//
// Events that arrive while the loop is busy are written together, one
// write per client for the lot. A client whose socket is full keeps what
// was not written (up to 4 MiB, then it is dropped) and gets it with the
// next event; a client whose write fails is dropped. The sockets and the
// writes are internal/rawsse's, as in the benchmark origin.
//
// It stops on SIGINT/SIGTERM, after -duration, or when the upstream stream
// ends.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sse-fanout/caddy-sse-fanout/tests/internal/rawsse"
)

const (
	maxPending   = 4 << 20 // bytes a client may have unwritten before it is dropped
	maxHead      = 16 << 10
	maxDuration  = 24 * time.Hour
	queueLen     = 1 << 16 // events read from upstream, waiting for the writer
	responseHead = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n" +
		"Transfer-Encoding: chunked\r\n\r\n"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8090", "address to listen on")
	upstream := flag.String("upstream", "", "the origin's SSE URL, http://host:port/path (required)")
	duration := flag.Duration("duration", time.Hour, fmt.Sprintf("stop after this long (max %s)", maxDuration))
	flag.Parse()
	switch {
	case *upstream == "":
		fatalf("-upstream is required")
	case *duration <= 0 || *duration > maxDuration:
		fatalf("-duration must be positive and at most %s", maxDuration)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fatalf("%v", err)
	}
	f := &floor{events: make(chan []byte, queueLen)}
	go f.clients.Serve(ln)
	go f.read(ctx, *upstream)
	fmt.Printf("ssefloor: listening on %s\n", ln.Addr())
	f.write(ctx)
	ln.Close()
	fmt.Printf("ssefloor: stopped; %d clients at the most, %d dropped\n", f.clients.Peak(), f.clients.Dropped())
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "ssefloor: "+format+"\n", args...)
	os.Exit(2)
}

// floor hands the events to the clients.
type floor struct {
	events  chan []byte // chunks framed by read; closed when upstream ends
	clients rawsse.Clients
}

// read follows the upstream stream and queues each event, framed as one
// chunk. It closes f.events when the stream ends.
func (f *floor) read(ctx context.Context, url string) {
	defer close(f.events)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		fatalf("-upstream: %v", err)
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fatalf("upstream: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fatalf("upstream: status %s", resp.Status)
	}
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	var event []byte
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if ctx.Err() == nil {
				fmt.Fprintln(os.Stderr, "ssefloor: upstream ended:", err)
			}
			return
		}
		event = append(event, line...)
		if len(bytes.TrimRight(line, "\r\n")) > 0 {
			continue
		}
		if len(event) > len(line) { // not a stray blank line
			f.events <- rawsse.Frame(nil, event)
		}
		event = event[:0]
	}
}

// write sends each event to every client until ctx ends or the upstream
// stream does.
func (f *floor) write(ctx context.Context) {
	defer f.clients.Close()
	var batch []byte
	for {
		select {
		case <-ctx.Done():
			return
		case chunk, ok := <-f.events:
			if !ok {
				return
			}
			batch = append(batch[:0], chunk...)
		}
		for more := true; more; { // events that came meanwhile go out together
			select {
			case chunk, ok := <-f.events:
				more = ok
				batch = append(batch, chunk...)
			default:
				more = false
			}
		}
		f.clients.Join(nil)
		f.clients.Write(batch)
	}
}
