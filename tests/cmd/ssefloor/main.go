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
// next event; a client whose write fails is dropped.
//
// It stops on SIGINT/SIGTERM, after -duration, or when the upstream stream
// ends.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
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
	go f.accept(ln)
	go f.read(ctx, *upstream)
	fmt.Printf("ssefloor: listening on %s\n", ln.Addr())
	f.write(ctx)
	ln.Close()
	fmt.Printf("ssefloor: stopped; %d clients at the end, %d dropped\n", len(f.clients), f.dropped)
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "ssefloor: "+format+"\n", args...)
	os.Exit(2)
}

// floor hands the events to the clients.
type floor struct {
	events chan []byte // chunks framed by read; closed when upstream ends

	mu     sync.Mutex
	joined []*client // accepted since the writer last looked

	clients []*client // the writer's own
	dropped int
}

// client is one client socket, a bare non-blocking descriptor.
type client struct {
	fd      int
	pending []byte // not yet written
}

// accept takes each connection, answers its request with the response
// head and hands its descriptor to the writer.
func (f *floor) accept(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			c, err := start(conn)
			if err != nil {
				fmt.Fprintln(os.Stderr, "ssefloor: a client:", err)
				return
			}
			f.mu.Lock()
			f.joined = append(f.joined, c)
			f.mu.Unlock()
		}()
	}
}

// start reads the request head, writes the response head and takes the
// socket out of Go's network poller (a duplicate descriptor; the net.Conn
// is closed).
func start(conn net.Conn) (*client, error) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReaderSize(conn, 4096)
	for n := 0; ; {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return nil, fmt.Errorf("reading the request: %w", err)
		}
		if n += len(line); n > maxHead {
			return nil, errors.New("request head too long")
		}
		if len(bytes.TrimSpace(line)) == 0 {
			break
		}
	}
	if _, err := conn.Write([]byte(responseHead)); err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	fd, err := dupFD(conn)
	if err != nil {
		return nil, err
	}
	return &client{fd: fd}, nil
}

func dupFD(conn net.Conn) (int, error) {
	raw, err := conn.(syscall.Conn).SyscallConn()
	if err != nil {
		return -1, err
	}
	fd, derr := -1, error(nil)
	if err := raw.Control(func(f uintptr) { fd, derr = syscall.Dup(int(f)) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, fmt.Errorf("dup: %w", derr)
	}
	syscall.CloseOnExec(fd)
	return fd, syscall.SetNonblock(fd, true)
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
			f.events <- frame(event)
		}
		event = event[:0]
	}
}

// frame makes one HTTP/1.1 chunk of an event.
func frame(event []byte) []byte {
	chunk := strconv.AppendInt(make([]byte, 0, len(event)+16), int64(len(event)), 16)
	chunk = append(chunk, "\r\n"...)
	chunk = append(chunk, event...)
	return append(chunk, "\r\n"...)
}

// write sends each event to every client until ctx ends or the upstream
// stream does.
func (f *floor) write(ctx context.Context) {
	defer f.closeAll()
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
		f.takeJoined()
		f.writeAll(batch)
	}
}

func (f *floor) takeJoined() {
	f.mu.Lock()
	f.clients = append(f.clients, f.joined...)
	f.joined = f.joined[:0]
	f.mu.Unlock()
}

// writeAll makes one write per client: the batch, after what it still
// had pending.
func (f *floor) writeAll(batch []byte) {
	live := f.clients[:0]
	for _, c := range f.clients {
		p := batch
		if len(c.pending) > 0 {
			c.pending = append(c.pending, batch...)
			p = c.pending
		}
		n, err := syscall.Write(c.fd, p)
		switch {
		case errors.Is(err, syscall.EAGAIN):
			n = 0
		case err != nil:
			f.drop(c)
			continue
		}
		if rest := p[n:]; len(rest) > 0 {
			if len(rest) > maxPending {
				f.drop(c)
				continue
			}
			c.pending = append(c.pending[:0], rest...)
		} else {
			c.pending = c.pending[:0]
		}
		live = append(live, c)
	}
	clear(f.clients[len(live):])
	f.clients = live
}

func (f *floor) drop(c *client) {
	syscall.Close(c.fd)
	f.dropped++
}

func (f *floor) closeAll() {
	f.takeJoined()
	for _, c := range f.clients {
		syscall.Close(c.fd)
	}
}
