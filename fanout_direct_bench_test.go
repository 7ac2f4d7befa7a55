package ssefanout

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// directClients attaches n clients to s as the fast path has them: real
// loopback TCP connections whose proxy ends are in the stream's writer's
// fast set. It returns the other ends, which the caller drains.
func directClients(tb testing.TB, s *stream, h *Handler, n int) []*net.TCPConn {
	tb.Helper()
	peers := make([]*net.TCPConn, 0, n)
	for range n {
		c, peer := directClient(tb, s, h)
		s.mu.Lock()
		s.fan.fast = append(s.fan.fast, c)
		s.fan.sent = s.hist.head
		s.mu.Unlock()
		peers = append(peers, peer)
	}
	return peers
}

// directClient makes one client of s on a real loopback TCP connection, as
// the take-over leaves it, and returns it with the other end.
func directClient(tb testing.TB, s *stream, h *Handler) (*client, *net.TCPConn) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	peer, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	conn, err := ln.Accept()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { peer.Close(); conn.Close() })
	raw, err := newRawSocket(conn.(*net.TCPConn))
	if err != nil {
		tb.Fatal(err)
	}
	s.hub.hijacked.Add(1)
	c := &client{h: h, s: s, sock: raw, hangup: make(chan struct{}), started: time.Now(), cursor: s.position()}
	return c, peer.(*net.TCPConn)
}

// drain reads what the peers received so far without waiting (a
// non-blocking read(2) until the socket is empty), and returns how many
// bytes that was.
func drain(tb testing.TB, peers []*net.TCPConn) int {
	tb.Helper()
	buf := make([]byte, 64<<10)
	total := 0
	for _, p := range peers {
		rc, err := p.SyscallConn()
		if err != nil {
			tb.Fatal(err)
		}
		for {
			var n int
			var rerr error
			if err := rc.Read(func(fd uintptr) bool { n, rerr = syscall.Read(int(fd), buf); return true }); err != nil {
				tb.Fatal(err)
			}
			if rerr == syscall.EAGAIN {
				break
			}
			if rerr != nil || n == 0 {
				tb.Fatalf("peer: %d bytes, %v", n, rerr)
			}
			total += n
		}
	}
	return total
}

// The writer's pass allocates nothing: every client gets the entry's own
// frame with one non-blocking write, and a stream whose clients are all
// written by its writer allocates nothing per publish either.
func TestDirectDeliveryAllocatesNothing(t *testing.T) {
	s := benchStream(t)
	h := benchHandler()
	peers := directClients(t, s, h, 100)
	wire, id := benchWire(t, 1, benchEventSize)
	e := framedEntry(entryEvent, wire, entry{id: id, setsID: true, hasID: true})
	events := 0
	allocs := testing.AllocsPerRun(200, func() {
		s.append(e)
		s.fan.pass()
		events++
	})
	if allocs != 0 {
		t.Fatalf("publishing and writing an event to 100 direct clients: %v allocations, want 0", allocs)
	}
	// the kernel may still be moving the last bytes over loopback
	got, want := 0, len(peers)*events*len(e.frame)
	for deadline := time.Now().Add(5 * time.Second); got < want && time.Now().Before(deadline); {
		got += drain(t, peers)
		time.Sleep(5 * time.Millisecond)
	}
	if got != want {
		t.Fatalf("the peers received %d bytes, want %d (every frame to every client)", got, want)
	}
	if n := len(s.fan.fast); n != 100 {
		t.Fatalf("%d clients left the fast set", n)
	}
}

// A storm of clients joining costs one look at each for signals, not a
// look at every fast client per pass; a signal still has the writer look
// at all of them, and a client that hung up leaves at once.
func TestJoiningLooksOnlyAtTheNewClients(t *testing.T) {
	s := benchStream(t)
	h := benchHandler()
	directClients(t, s, h, 200)
	f := s.fan
	f.pass()
	base := f.looked
	var last *client
	for range 200 { // one pass per client joining, the worst case
		c, _ := directClient(t, s, h)
		f.mu.Lock()
		f.adds = append(f.adds, c)
		f.mu.Unlock()
		f.pass()
		last = c
	}
	if n := len(f.fast); n != 400 {
		t.Fatalf("%d fast clients, want 400", n)
	}
	if looked := f.looked - base; looked != 200 {
		t.Fatalf("200 clients joining one pass each: %d looks, want 200 (one each)", looked)
	}
	// counted as a client that joined and was taken over, as its end
	// uncounts it
	s.hub.mu.Lock()
	s.clients++
	s.hub.mu.Unlock()
	metrics.clients.Inc()
	metrics.directClients.Inc()
	clients0, direct0 := testutil.ToFloat64(metrics.clients), direct()
	last.onHangup()
	base = f.looked
	f.pass()
	if looked := f.looked - base; looked != 400 {
		t.Fatalf("after a hang-up: %d looks, want 400 (every client)", looked)
	}
	if n := len(f.fast); n != 399 {
		t.Fatalf("after a hang-up: %d fast clients, want 399", n)
	}
	if c, d := testutil.ToFloat64(metrics.clients), direct(); c != clients0-1 || d != direct0-1 {
		t.Fatalf("after a hang-up: gauges %v clients, %v direct, want %v and %v", c, d, clients0-1, direct0-1)
	}
	base = f.looked
	f.pass()
	if looked := f.looked - base; looked != 0 {
		t.Fatalf("a pass with nothing to look at: %d looks", looked)
	}
}

// BenchmarkDeliverDirect is the fast path's cost per delivery: one event
// published, then written by the stream's writer to every client with one
// non-blocking write(2) on a real loopback socket. The peers are drained
// outside the timed part.
func BenchmarkDeliverDirect(b *testing.B) {
	for _, n := range []int{10, 1000} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) {
			s := benchStream(b)
			h := benchHandler()
			peers := directClients(b, s, h, n)
			wire, id := benchWire(b, 1, benchEventSize)
			e := framedEntry(entryEvent, wire, entry{id: id, setsID: true, hasID: true})
			cpu0 := processCPU(b)
			events := 0
			b.ReportAllocs()
			for b.Loop() {
				s.append(e)
				s.fan.pass()
				if events++; events%64 == 0 {
					b.StopTimer()
					drain(b, peers)
					b.StartTimer()
				}
			}
			deliveries := float64(events) * float64(n)
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/deliveries, "ns/delivery")
			b.ReportMetric(float64((processCPU(b)-cpu0).Nanoseconds())/deliveries, "cpu-ns/delivery-with-drain")
			if len(s.fan.fast) != n {
				b.Fatalf("%d of %d clients left the fast set", n-len(s.fan.fast), n)
			}
		})
	}
}

// A stream with enough direct clients is written by several goroutines
// at once, each client by exactly one: every client gets every frame once,
// in order, and stays in the fast set.
func TestShardedWritesReachEveryClient(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	s := benchStream(t)
	h := benchHandler()
	const n = 4 * shardMin
	peers := directClients(t, s, h, n)
	var want []byte
	for i := range 20 {
		wire, id := benchWire(t, i, benchEventSize)
		e := framedEntry(entryEvent, wire, entry{id: id, setsID: true, hasID: true})
		want = append(want, e.frame...)
		s.append(e)
		s.fan.pass()
	}
	if len(s.fan.fast) != n {
		t.Fatalf("%d of %d clients left the fast set", n-len(s.fan.fast), n)
	}
	seen := map[*client]bool{}
	for _, c := range s.fan.fast {
		if seen[c] {
			t.Fatal("a client is twice in the fast set")
		}
		seen[c] = true
	}
	buf := make([]byte, len(want))
	for i, p := range peers {
		_ = p.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(p, buf); err != nil {
			t.Fatalf("peer %d: %v", i, err)
		}
		if !bytes.Equal(buf, want) {
			t.Fatalf("peer %d got other bytes than the 20 frames in order", i)
		}
	}
}
