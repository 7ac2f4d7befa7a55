package ssefanout

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Benchmarks of the fan-out hot path without the network: publishing into
// a stream's history, and delivering to clients through the real client
// loop (serveClient → client.loop → collect → write + flush) against a
// ResponseWriter that only counts bytes. What they measure is the module's
// own cost per event and per delivery; a real socket adds one write system
// call (and the kernel's work) per delivery on top.
//
//	go test -run XXX -bench 'Publish|Deliver' -benchmem -count 6 .

// benchEventSize is the size of the encoded events used below.
const benchEventSize = 200

// benchSettings are the hub settings of the benchmark streams: the module's
// defaults.
func benchSettings() hubSettings {
	return hubSettings{
		history:      defaultHistory,
		historyBytes: defaultHistoryBytes,
		maxEventSize: defaultMaxEventSize,
		linger:       defaultLinger,
		maxStreams:   defaultMaxStreams,
	}
}

// benchStream returns a stream of a hub with no transport, as hub.attach
// builds it, whose upstream loop is never started. Its first answer is
// already in, so clients start streaming at once.
func benchStream(tb testing.TB) *stream {
	tb.Helper()
	tmpl, err := parseUpstream("http://127.0.0.1:9")
	if err != nil {
		tb.Fatal(err)
	}
	h := newHub(tmpl, nil, nil, &hubConfig{settings: benchSettings(), logger: zap.NewNop()})
	tb.Cleanup(func() { _ = h.Destruct() })
	target := &url.URL{Scheme: "http", Host: "127.0.0.1:9", Path: "/events"}
	s := newStream(h, target.String(), target, http.Header{}, "", benchSettings())
	s.answer(answer{state: stateLive, header: http.Header{}})
	return s
}

// benchWire returns event number i encoded as the upstream loop encodes it,
// exactly size bytes long: an id and a JSON data line with a timestamp and
// padding.
func benchWire(tb testing.TB, i, size int) ([]byte, string) {
	tb.Helper()
	id := fmt.Sprintf("%08d", i)
	head := fmt.Sprintf(`id: %s`+"\n"+`data: {"ts":%d,"pad":"`, id, 1700000000000000000+int64(i))
	tail := `"}` + "\n\n"
	n := size - len(head) - len(tail)
	if n < 0 {
		tb.Fatalf("event size %d too small", size)
	}
	wire := []byte(head + strings.Repeat("x", n) + tail)
	return wire, id
}

// BenchmarkPublish appends a pre-encoded 200-byte event to a stream with a
// full history of 1000 (so that every publish also evicts one) and no
// clients. The one allocation expected is the new wake channel.
func BenchmarkPublish(b *testing.B) {
	s := benchStream(b)
	wire, id := benchWire(b, 1, benchEventSize)
	e := framedEntry(entryEvent, wire, entry{id: id, setsID: true, hasID: true})
	for range defaultHistory {
		s.append(e)
	}
	b.SetBytes(int64(len(wire)))
	b.ReportAllocs()
	for b.Loop() {
		s.append(e)
	}
}

// BenchmarkParseEncodePublish is the upstream side of one event: the parser
// reads a 200-byte event (each with a new id, as origins send them), the
// event is encoded once and published, as stream.read does.
func BenchmarkParseEncodePublish(b *testing.B) {
	s := benchStream(b)
	const inputs = 1024
	in := make([][]byte, inputs)
	for i := range in {
		in[i], _ = benchWire(b, i+1, benchEventSize)
	}
	p := newParser(defaultMaxEventSize)
	published := 0
	// the recEvent case of the emit function of stream.read
	emit := func(r *record) {
		if r.kind != recEvent {
			return
		}
		frame := newFrame(encodedLen(r))
		hdr := uint8(len(frame))
		frame = closeFrame(appendEvent(frame, r))
		s.append(entry{kind: entryEvent, frame: frame, hdr: hdr, id: r.id, setsID: r.setsID, hasID: r.hasID})
		published++
	}
	for i := range defaultHistory {
		p.feed(in[i%inputs], emit)
	}
	b.SetBytes(benchEventSize)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		p.feed(in[i%inputs], emit)
		i++
	}
	if published != defaultHistory+i {
		b.Fatalf("published %d events, want %d", published, defaultHistory+i)
	}
}

// BenchmarkDeliver runs N clients through the real client path
// (Handler.serveClient, whose client.loop collects from the ring, writes and
// flushes through an http.ResponseController) against a sink
// ResponseWriter, and publishes b.N 200-byte events. Each event is published
// once every client has received the previous one, so that each delivery is
// a wake-up, a collect and one write + flush: the per-event cost at any
// event rate the clients keep up with (a faster origin only makes clients
// coalesce several events into one write, which is cheaper per event). One
// op is one event delivered to all N clients; ns/delivery and
// allocs/delivery are per event per client. The harness adds one atomic add
// per delivery and one channel hand-off per event.
func BenchmarkDeliver(b *testing.B) {
	for _, n := range []int{10, 1000} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) { benchmarkDeliver(b, n) })
	}
}

func benchmarkDeliver(b *testing.B, clients int) {
	s := benchStream(b)
	h := benchHandler()
	wire, id := benchWire(b, 1, benchEventSize)
	e := framedEntry(entryEvent, wire, entry{id: id, setsID: true, hasID: true})

	// each request has a context of its own, canceled with the
	// connection's, as net/http gives it
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := &deliveryCount{all: make(chan struct{}, 1), failed: make(chan string, clients)}
	var idle0, idle1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&idle0)
	var started, running sync.WaitGroup
	started.Add(clients)
	running.Add(clients)
	for range clients {
		w := &sinkWriter{header: make(http.Header), d: d, started: &started}
		reqCtx, reqCancel := context.WithCancel(ctx)
		req, err := http.NewRequestWithContext(reqCtx, http.MethodGet, "http://127.0.0.1/events", nil)
		if err != nil {
			b.Fatal(err)
		}
		go func() {
			defer reqCancel()
			defer running.Done()
			_ = h.serveClient(w, req, s, s.position(), lastID{})
			if ctx.Err() == nil {
				d.failed <- fmt.Sprintf("a client loop ended early after %d bytes", w.n)
				if !w.flushed {
					started.Done()
				}
			}
		}()
	}
	started.Wait() // every client has flushed its head: it is in its loop
	runtime.GC()
	runtime.ReadMemStats(&idle1)

	timeout := time.NewTimer(time.Minute)
	defer timeout.Stop()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	cpu0 := processCPU(b)
	events := 0
	for b.Loop() {
		timeout.Reset(time.Minute)
		events++
		d.want.Store(int64(events) * int64(clients))
		s.append(e)
		select {
		case <-d.all:
		case msg := <-d.failed:
			b.Fatal(msg)
		case <-timeout.C:
			b.Fatalf("event %d not delivered to every client within a minute (%d of %d deliveries)", events, d.got.Load(), d.want.Load())
		}
	}
	elapsed := b.Elapsed()
	cpu := processCPU(b) - cpu0
	runtime.ReadMemStats(&after)
	deliveries := float64(events) * float64(clients)
	b.ReportMetric(float64(elapsed.Nanoseconds())/deliveries, "ns/delivery")
	// CPU time (user + system, all threads) per delivery: steadier than
	// wall time on a machine shared with other work
	b.ReportMetric(float64(cpu.Nanoseconds())/deliveries, "cpu-ns/delivery")
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/deliveries, "allocs/delivery")
	b.ReportMetric(float64(d.writes.Load())/deliveries, "writes/delivery")
	// the heap an idle client holds in the module (its sink and request
	// included, net/http's connection buffers and goroutine stacks not)
	b.ReportMetric(float64(idle1.HeapAlloc-idle0.HeapAlloc)/float64(clients), "heap-B/client")

	cancel()
	running.Wait()
}

// processCPU returns the CPU time the process has used so far.
func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchHandler is a handler with the default options, as Provision leaves
// it, minus the hub and transport (serveClient needs neither), with
// keepalives far enough apart that none is written during a run.
func benchHandler() *Handler {
	h := &Handler{Upstream: "http://127.0.0.1:9", Keepalive: caddy.Duration(time.Hour)}
	h.setDefaults()
	h.logger = zap.NewNop()
	h.stopping = make(chan struct{})
	h.state = new(handlerState)
	return h
}

// deliveryCount counts the events the clients have received.
type deliveryCount struct {
	got    atomic.Int64  // events received, summed over the clients
	want   atomic.Int64  // the count at which every client has the last event
	writes atomic.Int64  // writes to the sinks
	all    chan struct{} // signalled when got reaches want
	failed chan string   // a client loop ended on its own
}

// sinkWriter is a cheap http.ResponseWriter for one client: it counts the
// bytes and events written, and supports what http.ResponseController uses
// (Flush, SetWriteDeadline). Only its client's goroutine calls it.
type sinkWriter struct {
	header  http.Header
	n       int // bytes written
	events  int // whole events written
	flushed bool
	d       *deliveryCount
	started *sync.WaitGroup
}

func (w *sinkWriter) Header() http.Header { return w.header }
func (w *sinkWriter) WriteHeader(int)     {}

func (w *sinkWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	w.d.writes.Add(1)
	if ev := w.n / benchEventSize; ev > w.events {
		delta := ev - w.events
		w.events = ev
		if w.d.got.Add(int64(delta)) == w.d.want.Load() {
			select {
			case w.d.all <- struct{}{}:
			default:
			}
		}
	}
	return len(p), nil
}

func (w *sinkWriter) Flush() {
	if !w.flushed {
		w.flushed = true
		w.started.Done()
	}
}

func (w *sinkWriter) SetWriteDeadline(time.Time) error { return nil }
