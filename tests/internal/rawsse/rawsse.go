// Package rawsse writes one Server-Sent Events stream to many HTTP/1.1
// clients the cheapest way there is: each client socket is a bare
// non-blocking descriptor, and one goroutine makes one write(2) per client
// per batch of events. No goroutine, buffer or flush per client. The
// benchmark origin and the write floor are made of it; the load tool
// reads its sockets through Detach.
package rawsse

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sse-fanout/caddy-sse-fanout/internal/rawwrite"
)

// Head is the response head every client gets: the events follow as
// chunks.
const Head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n" +
	"Transfer-Encoding: chunked\r\n\r\n"

const (
	// MaxPending is how much a client may have left unwritten before it
	// is dropped.
	MaxPending  = 4 << 20
	headTimeout = 10 * time.Second
	notAllowed  = "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)

// Clients is a set of client sockets. Serve adds to it from its own
// goroutines; Join, Write and Close belong to one writer goroutine.
type Clients struct {
	mu     sync.Mutex
	joined []*client // accepted, not yet taken by Join

	clients []*client // the writer's

	open, peak, dropped atomic.Int64
}

type client struct {
	fd          int
	lastEventID string
	pending     []byte // not yet written
}

// Serve accepts connections on ln until ln is closed. Each one's request
// head is read and answered with Head (or a 405 for a method other than
// GET); then the client waits for the writer's next Join.
func (c *Clients) Serve(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			if err := c.start(conn); err != nil {
				fmt.Fprintln(os.Stderr, "rawsse: a client:", err)
			}
		}()
	}
}

// start answers a connection and hands its socket over, as a duplicate
// descriptor: the net.Conn is closed.
func (c *Clients) start(conn net.Conn) error {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(headTimeout))
	req, err := http.ReadRequest(bufio.NewReader(conn))
	if err != nil {
		return fmt.Errorf("reading the request: %w", err)
	}
	if req.Method != http.MethodGet {
		_, err := conn.Write([]byte(notAllowed))
		return err
	}
	if _, err := conn.Write([]byte(Head)); err != nil {
		return err
	}
	fd, err := Detach(conn)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.joined = append(c.joined, &client{fd: fd, lastEventID: req.Header.Get("Last-Event-ID")})
	c.mu.Unlock()
	n := c.open.Add(1)
	for p := c.peak.Load(); n > p && !c.peak.CompareAndSwap(p, n); p = c.peak.Load() {
	}
	return nil
}

// Detach returns a duplicate of conn's socket descriptor, non-blocking and
// close-on-exec, for use with raw system calls; closing conn then takes it
// out of Go's network poller and leaves the socket open through the
// duplicate.
func Detach(conn net.Conn) (int, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return -1, errors.New("connection has no descriptor")
	}
	raw, err := sc.SyscallConn()
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
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	return fd, nil
}

// Join takes the clients accepted since its last call. For each, first
// (if not nil) gives what it is to get before the next Write, from its
// request's Last-Event-ID: framed chunks, or nil.
func (c *Clients) Join(first func(lastEventID string) []byte) {
	c.mu.Lock()
	joined := c.joined
	c.joined = nil
	c.mu.Unlock()
	for _, cl := range joined {
		if first != nil {
			cl.pending = first(cl.lastEventID)
		}
		c.clients = append(c.clients, cl)
	}
}

// Write makes one write(2) per client: what it still had pending, then p
// (framed chunks). A client whose socket is full keeps the rest for the
// next Write, up to MaxPending, past which it is dropped, as is a client
// whose write fails.
func (c *Clients) Write(p []byte) {
	live := c.clients[:0]
	for _, cl := range c.clients {
		if c.write(cl, p) {
			live = append(live, cl)
		} else {
			c.drop(cl)
		}
	}
	clear(c.clients[len(live):])
	c.clients = live
}

// write writes to one client and says whether it stays.
func (c *Clients) write(cl *client, p []byte) bool {
	if len(cl.pending) > 0 {
		cl.pending = append(cl.pending, p...)
		p = cl.pending
	}
	if len(p) == 0 {
		return true
	}
	// the plugin's own write, so that the floor is the least a proxy
	// can do
	n, err := rawwrite.Write(uintptr(cl.fd), p)
	switch {
	case errors.Is(err, syscall.EAGAIN):
		n = 0
	case err != nil:
		return false
	}
	rest := p[n:]
	if len(rest) > MaxPending {
		return false
	}
	cl.pending = append(cl.pending[:0], rest...) // may move within pending itself
	return true
}

func (c *Clients) drop(cl *client) {
	syscall.Close(cl.fd)
	c.open.Add(-1)
	c.dropped.Add(1)
}

// Close closes every client socket, joined or not.
func (c *Clients) Close() {
	c.Join(nil)
	for _, cl := range c.clients {
		syscall.Close(cl.fd)
	}
	c.open.Add(-int64(len(c.clients)))
	c.clients = nil
}

// Open is the number of clients connected.
func (c *Clients) Open() int64 { return c.open.Load() }

// Peak is the most clients that were connected at once.
func (c *Clients) Peak() int64 { return c.peak.Load() }

// Dropped is the number of clients dropped for a failed write or a full
// socket.
func (c *Clients) Dropped() int64 { return c.dropped.Load() }

// Frame appends data framed as one HTTP/1.1 chunk to dst; a chunk may hold
// any number of events. Empty data frames as nothing (an empty chunk would
// end the body).
func Frame(dst, data []byte) []byte {
	if len(data) == 0 {
		return dst
	}
	dst = strconv.AppendInt(dst, int64(len(data)), 16)
	dst = append(dst, "\r\n"...)
	dst = append(dst, data...)
	return append(dst, "\r\n"...)
}
