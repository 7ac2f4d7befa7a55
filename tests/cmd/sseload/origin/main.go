// Command origin is the benchmark Server-Sent Events origin for sseload: on
// every path it streams one shared sequence of events,
//
//	id: 42
//	data: {"ts":1700000000123456789,"seq":42,"pad":"xxxx…"}
//
// at -rate events per second, where ts is the Unix time in nanoseconds at
// which the event was made (sseload measures delivery latency from it), seq
// repeats the id (for servers that replace the ids with their own) and pad
// fills the JSON to -size bytes (while seq has at most 7 digits). Every connection gets the events from
// the one it joined at on, or after its Last-Event-ID while that is among
// the last -backlog events. It comments ": keepalive" on a stream idle for
// 15s.
//
// Every second it prints how many event streams it has open (and the
// peak): with a proxy in front, this is the origin load the proxy causes.
// The streams are written as the write floor writes its clients (package
// internal/rawsse: one write per stream per batch of events, from one
// goroutine), so that the origin costs little beside the proxy it feeds,
// even with a stream per client.
//
//	go run ./cmd/sseload/origin -listen 127.0.0.1:9000 -rate 10 -size 200
//
// With -publish URL it also POSTs each event's data, in order, on one
// keep-alive connection, to a publisher such as nchan's. With -count K it
// makes K events and then only keeps its streams open; with -wait-signal
// it makes none until it gets SIGUSR1 (a burst: -count K -wait-signal).
//
// It stops after -duration (at most 24h) or on SIGINT/SIGTERM.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sse-fanout/caddy-sse-fanout/tests/internal/rawsse"
)

const (
	maxRate      = 100000
	maxSize      = 1 << 20
	minSize      = len(`{"ts":1700000000000000000,"seq":1000000,"pad":""}`)
	maxDuration  = 24 * time.Hour
	keepalive    = 15 * time.Second
	maxBatch     = 256 << 10 // most bytes written to a connection at once
	publishQueue = 1 << 16   // events waiting to be posted
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9000", "address to listen on")
	rate := flag.Float64("rate", 10, fmt.Sprintf("events per second (0 < rate <= %d)", maxRate))
	size := flag.Int("size", 200, fmt.Sprintf("bytes of each event's data, the JSON object (%d..%d)", minSize, maxSize))
	backlog := flag.Int("backlog", 1000, "events kept for clients that resume with Last-Event-ID (1..1000000)")
	duration := flag.Duration("duration", time.Hour, fmt.Sprintf("stop after this long (max %s)", maxDuration))
	quiet := flag.Bool("quiet", false, "print the connection counts only when they change")
	publish := flag.String("publish", "", "also POST each event's data to this http:// URL (e.g. an nchan publisher)")
	count := flag.Uint64("count", 0, "make this many events, then stop making them (0: no limit)")
	waitSignal := flag.Bool("wait-signal", false, "make no event before SIGUSR1")
	flag.Parse()
	switch {
	case *rate <= 0 || *rate > maxRate:
		fatalf("-rate must be in (0, %d]", maxRate)
	case *size < minSize || *size > maxSize:
		fatalf("-size must be between %d and %d", minSize, maxSize)
	case *backlog < 1 || *backlog > 1000000:
		fatalf("-backlog must be between 1 and 1000000")
	case *duration <= 0 || *duration > maxDuration:
		fatalf("-duration must be positive and at most %s", maxDuration)
	case *publish != "" && !strings.HasPrefix(*publish, "http://"):
		fatalf("-publish must be an http:// URL")
	}
	start := make(chan os.Signal, 1)
	if *waitSignal {
		signal.Notify(start, syscall.SIGUSR1)
	} else {
		start <- syscall.SIGUSR1
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()

	o := &origin{feed: newFeed(*backlog), size: *size, count: *count}
	if *publish != "" {
		o.published = make(chan []byte, publishQueue)
		go o.publish(ctx, *publish)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fatalf("%v", err)
	}
	go o.clients.Serve(ln)
	go func() {
		select {
		case <-start:
			o.generate(ctx, *rate)
		case <-ctx.Done():
		}
	}()
	go o.report(ctx, *quiet)
	fmt.Printf("origin: listening on %s, %.4g events/s of %d bytes\n", ln.Addr(), *rate, *size)
	o.serve(ctx)
	ln.Close()
	fmt.Printf("origin: stopped; peak %d streams, %d events made, %d streams dropped\n",
		o.clients.Peak(), o.feed.position(), o.clients.Dropped())
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "origin: "+format+"\n", args...)
	os.Exit(2)
}

// origin makes the feed and serves it on every path.
type origin struct {
	feed      *feed
	size      int         // of an event's data
	count     uint64      // events to make; 0: no limit
	published chan []byte // data to POST to the publisher, if any

	clients rawsse.Clients
}

// report prints the counts every second.
func (o *origin) report(ctx context.Context, quiet bool) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		line := fmt.Sprintf("streams=%d", o.clients.Open())
		if quiet && line == last {
			continue
		}
		last = line
		fmt.Printf("origin: %s %s peak_streams=%d events=%d\n", time.Now().Format("15:04:05"),
			line, o.clients.Peak(), o.feed.position())
	}
}

// generate makes the events: as many as are due at rate since the start,
// checked every 1/rate (at least every 1ms), so that high rates are kept.
func (o *origin) generate(ctx context.Context, rate float64) {
	interval := max(time.Duration(float64(time.Second)/rate), time.Millisecond)
	t := time.NewTicker(interval)
	defer t.Stop()
	start := time.Now()
	pad := strings.Repeat("x", o.size)
	var made uint64
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			due := uint64(now.Sub(start).Seconds()*rate) + 1
			if o.count > 0 {
				due = min(due, o.count)
			}
			for ; made < due; made++ {
				o.make(made+1, pad)
			}
			if o.count > 0 && made == o.count {
				return
			}
		}
	}
}

// make publishes the event with this id, made now; its data is o.size
// bytes, padded from pad.
func (o *origin) make(id uint64, pad string) {
	wire := make([]byte, 0, o.size+32)
	wire = append(wire, "id: "...)
	wire = strconv.AppendUint(wire, id, 10)
	wire = append(wire, "\ndata: "...)
	data := len(wire)
	wire = append(wire, `{"ts":`...)
	wire = strconv.AppendInt(wire, time.Now().UnixNano(), 10)
	wire = append(wire, `,"seq":`...)
	wire = strconv.AppendUint(wire, id, 10)
	wire = append(wire, `,"pad":"`...)
	wire = append(wire, pad[:max(0, o.size-(len(wire)-data)-len(`"}`))]...)
	wire = append(wire, `"}`...)
	end := len(wire)
	wire = append(wire, "\n\n"...)
	o.feed.publish(id, wire)
	if o.published != nil {
		select {
		case o.published <- wire[data:end]:
		default:
			fmt.Fprintln(os.Stderr, "origin: the publisher is too slow, an event was not posted")
		}
	}
}

// publish POSTs the events' data to url, one after the other, until ctx
// ends.
func (o *origin) publish(ctx context.Context, url string) {
	client := &http.Client{Timeout: 10 * time.Second}
	failures := 0
	for {
		var data []byte
		select {
		case <-ctx.Done():
			return
		case data = <-o.published:
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(data))
		if err != nil {
			fatalf("-publish: %v", err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode >= 300 {
				err = fmt.Errorf("status %s", resp.Status)
			}
		}
		if err != nil && ctx.Err() == nil {
			if failures++; failures <= 5 {
				fmt.Fprintf(os.Stderr, "origin: posting an event to %s: %v\n", url, err)
			}
		}
	}
}

// serve writes the feed to every client until ctx ends: one write per
// client per batch of new events, a keepalive comment after 15s without.
// A new client starts with the next events, or after its Last-Event-ID
// while that is among the last -backlog events.
func (o *origin) serve(ctx context.Context) {
	defer o.clients.Close()
	ka := time.NewTimer(keepalive)
	defer ka.Stop()
	cursor := o.feed.position()
	var raw, framed []byte
	for {
		o.clients.Join(func(lastEventID string) []byte { return o.backlog(lastEventID, cursor) })
		var wake <-chan struct{}
		raw, cursor, wake = o.feed.collect(cursor, raw[:0])
		if len(raw) > 0 {
			framed = rawsse.Frame(framed[:0], raw)
			o.clients.Write(framed)
			ka.Reset(keepalive)
			continue
		}
		select {
		case <-wake:
		case <-ka.C:
			o.clients.Write(rawsse.Frame(framed[:0], []byte(": keepalive\n\n")))
			ka.Reset(keepalive)
		case <-ctx.Done():
			return
		}
	}
}

// backlog is what a client that resumes after lastEventID gets before the
// events from cursor on: the events in between, framed, if they are still
// in the feed.
func (o *origin) backlog(lastEventID string, cursor uint64) []byte {
	id, err := strconv.ParseUint(lastEventID, 10, 64)
	if err != nil {
		return nil
	}
	return rawsse.Frame(nil, o.feed.between(o.feed.after(id, cursor), cursor, nil))
}

// feed is the shared event sequence: a ring of the last events, by
// sequence number (event id = sequence + 1), and a channel closed and
// replaced on every event.
type feed struct {
	mu   sync.RWMutex
	ring [][]byte
	head uint64 // sequence number of the next event
	wake chan struct{}
}

func newFeed(backlog int) *feed {
	return &feed{ring: make([][]byte, backlog), wake: make(chan struct{})}
}

func (f *feed) publish(id uint64, wire []byte) {
	f.mu.Lock()
	f.ring[f.head%uint64(len(f.ring))] = wire
	f.head = id
	wake := f.wake
	f.wake = make(chan struct{})
	f.mu.Unlock()
	close(wake)
}

func (f *feed) position() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.head
}

// after returns the cursor just after event id, or def when that is not in
// the ring.
func (f *feed) after(id, def uint64) uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	oldest := f.head - min(f.head, uint64(len(f.ring)))
	if id >= oldest && id <= f.head {
		return id
	}
	return def
}

// between appends the events from cursor from to cursor to (excluded)
// that are still in the ring to buf.
func (f *feed) between(from, to uint64, buf []byte) []byte {
	f.mu.RLock()
	defer f.mu.RUnlock()
	oldest := f.head - min(f.head, uint64(len(f.ring)))
	for c := max(from, oldest); c < min(to, f.head); c++ {
		buf = append(buf, f.ring[c%uint64(len(f.ring))]...)
	}
	return buf
}

// collect appends the events from cursor on to buf, up to maxBatch bytes;
// a client that fell out of the ring skips to the oldest event kept.
func (f *feed) collect(cursor uint64, buf []byte) ([]byte, uint64, <-chan struct{}) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	oldest := f.head - min(f.head, uint64(len(f.ring)))
	cursor = max(cursor, oldest)
	for ; cursor < f.head && len(buf) < maxBatch; cursor++ {
		buf = append(buf, f.ring[cursor%uint64(len(f.ring))]...)
	}
	return buf, cursor, f.wake
}
