package ssefanout

import (
	"bytes"
	"context"
	"errors"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sse-fanout/caddy-sse-fanout/internal/rawwrite"
)

// The fan-out fast path. A plaintext HTTP/1.1 client's connection is taken
// over after its response head (see client.hijack): net/http's and Caddy's
// per-request state is released, and the handler returns. While such a
// client is caught up, its stream's writer sends it each new entry with one
// non-blocking write(2) of the entry's pre-framed chunk: every caught-up
// client gets the same bytes, so the work per event is one system call per
// client. A client whose socket does not take a write at once leaves the
// fast set for a goroutine of its own (client.loop), which finishes the
// partly written bytes, serves it from its cursor under write_timeout like
// any client, and hands it back once it is caught up. Each client has
// exactly one writer at a time: the stream's writer or its own goroutine.

// fanout is a stream's writer for its fast clients.
type fanout struct {
	s    *stream
	poke chan struct{} // buffered: a publish or signal since the last pass
	// progress is signalled after each pass, for a publisher waiting for
	// room (see stream.append)
	progress chan struct{}
	// sentAt mirrors sent for publishers, and is zero while the writer
	// has no fast client
	sentAt atomic.Uint64

	// active is whether the writer goroutine runs: it has fast clients or
	// clients to merge, and ends when it has neither. Set under mu.
	active atomic.Bool

	mu   sync.Mutex
	adds []*client // handed over, not yet merged into fast
	// inPass is whether a pass is underway: set as pass takes the clients
	// to merge, cleared by run after it. passEnd, made when a joining
	// client first waits for it (see yieldToPass), is closed at its end.
	inPass  bool
	passEnd chan struct{}

	// signalled is set by a hang-up or a stream's signal (exit, reload,
	// its end) since the writer last looked at every fast client
	signalled atomic.Bool

	// Owned by the writer goroutine.
	fast []*client
	// due is when the writer must look at every fast client again, for a
	// keepalive or the end of a drain (zero: no such deadline)
	due time.Time
	// looked counts the clients looked at for signals, in all
	looked int
	// sent is where every fast client stands: all entries before it have
	// been written to each.
	sent uint64
	// batch and batchNoRetry hold several entries' frames, coalesced
	// once and written to every fast client
	batch, batchNoRetry []byte
}

func newFanout(s *stream) *fanout {
	return &fanout{s: s, poke: make(chan struct{}, 1), progress: make(chan struct{}, 1)}
}

// signal makes the writer look at every fast client in its next pass,
// soon: one may have hung up, or the stream, its config or the process
// may be ending. It never blocks.
func (f *fanout) signal() {
	f.signalled.Store(true)
	f.wake()
}

// wake makes the writer run a pass soon; it never blocks.
func (f *fanout) wake() {
	select {
	case f.poke <- struct{}{}:
	default:
	}
}

// adopt hands a hijacked client to the writer. Its cursor is at most the
// stream's head as the writer will next read it; the writer sends it what
// it lacks from there, or gives it back to a goroutine of its own.
func (f *fanout) adopt(c *client) {
	f.mu.Lock()
	f.adds = append(f.adds, c)
	start := !f.active.Load()
	// publishers keep what it has not been sent yet until it is merged
	if start || c.cursor < f.sentAt.Load() {
		f.sentAt.Store(c.cursor)
	}
	f.active.Store(true)
	f.mu.Unlock()
	if start {
		go f.run()
		return
	}
	f.wake()
}

// yieldToPass makes a joining client wait, when its stream's writer is in
// a pass, until that pass ends, before the client's own part of its
// connection's work: its response head and, on the fast path, its
// take-over and catch-up. In a connection storm on a busy core the writer
// then competes only with the part of each request that comes before the
// handler, and keeps to its passes, as a server whose fan-out holds its
// only thread does. Nothing is lost by the wait: the client has had no
// byte yet, and starts from the place it arrived at (or the oldest entry
// kept, if a burst meanwhile evicted that place: see client.start). It
// reports false when the client went away meanwhile.
func (f *fanout) yieldToPass(ctx context.Context) bool {
	f.mu.Lock()
	if !f.inPass {
		f.mu.Unlock()
		return true
	}
	if f.passEnd == nil {
		f.passEnd = make(chan struct{})
	}
	end := f.passEnd
	f.mu.Unlock()
	select {
	case <-end:
		return true
	case <-ctx.Done():
		return false
	}
}

// passEndedLocked lets the clients that waited for the pass go on. The
// caller holds mu.
func (f *fanout) passEndedLocked() {
	f.inPass = false
	if f.passEnd != nil {
		close(f.passEnd)
		f.passEnd = nil
	}
}

// run is the writer: a pass at each publish or signal, and at the next
// keepalive or drain deadline, until no fast client is left.
func (f *fanout) run() {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := f.pass()
		f.mu.Lock()
		// where the writer's clients stand, for publishers: the least of
		// its position and those of the clients waiting to be merged
		sentAt := f.sent
		for _, c := range f.adds {
			sentAt = min(sentAt, c.cursor)
		}
		f.sentAt.Store(sentAt)
		f.active.Store(len(f.fast) > 0 || len(f.adds) > 0)
		f.passEndedLocked()
		select {
		case f.progress <- struct{}{}:
		default:
		}
		if !f.active.Load() {
			f.mu.Unlock()
			return
		}
		f.mu.Unlock()
		if !next.IsZero() {
			timer.Reset(time.Until(next))
		}
		select {
		case <-f.poke:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// pass writes what was published since the last pass to every fast
// client, merges the clients handed over, and applies keepalives, drains,
// exits and hang-ups. It returns when the next deadline falls (zero for
// none).
func (f *fanout) pass() (next time.Time) {
	s := f.s
	f.mu.Lock()
	adds := f.adds
	f.adds = nil
	f.inPass = true
	f.mu.Unlock()

	s.mu.RLock()
	if len(f.fast) == 0 {
		f.sent = s.hist.head // nobody stands anywhere yet
	}
	evicted := f.sent < s.hist.oldest()
	b := f.collect(f.sent)
	// the clients handed over that join now, with what each lacks
	type merging struct {
		c *client
		p []byte
		t tally
	}
	var merges []merging
	var lagging, later []*client
	for _, c := range adds {
		switch {
		case c.cursor > b.next:
			later = append(later, c) // ahead of this pass: the next one
		case c.cursor < s.hist.oldest():
			lagging = append(lagging, c)
		default:
			p, t := s.hist.frames(c.cursor, b.next, c.h.Retry > 0)
			merges = append(merges, merging{c, p, t})
		}
	}
	final := s.state == stateFinal
	head := s.hist.head
	s.mu.RUnlock()

	now := time.Now()
	if evicted {
		// the writer fell behind what the history holds (a burst into a
		// small history): its clients resume by Last-Event-ID
		f.finishAll(endLagging)
	}
	if b.next != f.sent {
		f.sendAll(b, now)
		f.sent = b.next
	}
	merged := len(f.fast)
	for _, m := range merges {
		f.merge(m.c, m.p, m.t, now)
	}
	for _, c := range lagging {
		s.stats.drop(dropLagging)
		c.finish(endLagging)
	}
	if len(later) > 0 {
		f.mu.Lock()
		f.adds = append(f.adds, later...)
		f.mu.Unlock()
	}
	if b.next != head || len(later) > 0 {
		f.wake() // more than one batch was pending
	}
	// every fast client is looked at only when something may have
	// changed for it: looking at them all in each pass made a connection
	// storm quadratic (a pass per few clients merged, over all of them)
	streamOver := final && b.next == head
	from := merged // only those merged now
	if f.signalled.Swap(false) || streamOver || closed(s.done) || closed(s.hub.exit) ||
		(!f.due.IsZero() && !now.Before(f.due)) {
		from = 0
	}
	f.due = f.signals(from, now, streamOver)
	return f.due
}

// batch is what one pass writes to every fast client.
type batch struct {
	all []byte // the frames from the writer's position
	// noRetry is the same without the origin's retry lines, for clients
	// whose handler sends its own; nil when there was none
	noRetry []byte
	// shared is true when the bytes are the writer's buffers, which the
	// next pass reuses
	shared bool
	next   uint64 // the position after them
	tally         // what all carries
	// retryBytes are the retry lines' bytes in all, not in noRetry
	retryBytes int
}

// blocks reports whether appending size bytes would evict an entry that
// the writer has not yet sent to its clients. The caller holds the
// stream's lock.
func (f *fanout) blocks(size int) bool {
	h := &f.s.hist
	return h.full(size) && f.active.Load() && f.sentAt.Load() <= h.oldest()
}

// waitProgress waits for the writer's next pass, at most until deadline.
func (f *fanout) waitProgress(deadline time.Time) bool {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-f.progress:
		return true
	case <-t.C:
		return false
	}
}

// collect gathers the frames from cursor towards the head, up to maxBatch
// bytes. The caller holds the stream's read lock.
func (f *fanout) collect(cursor uint64) batch {
	h := &f.s.hist
	if cursor >= h.head || cursor < h.oldest() {
		return batch{next: h.head}
	}
	if e := h.at(cursor); h.head-cursor == 1 && e.kind != entryRetry {
		b := batch{all: e.frame, next: h.head} // as it is: no copy
		b.count(e)
		return b
	}
	all, noRetry := f.batch[:0], f.batchNoRetry[:0]
	sawRetry := false
	var t tally
	retryBytes := 0
	for ; cursor < h.head && len(all) < maxBatch; cursor++ {
		e := h.at(cursor)
		all = append(all, e.frame...)
		t.count(e)
		if e.kind == entryRetry {
			sawRetry = true
			retryBytes += len(e.payload())
			continue
		}
		noRetry = append(noRetry, e.frame...)
	}
	f.batch, f.batchNoRetry = keepSmall(all), keepSmall(noRetry)
	b := batch{all: all, shared: true, next: cursor, tally: t, retryBytes: retryBytes}
	if sawRetry {
		b.noRetry = noRetry
		if b.noRetry == nil { // retry lines alone: nothing for those clients
			b.noRetry = []byte{}
		}
	}
	return b
}

// keepSmall keeps a buffer for reuse unless a burst grew it past need.
func keepSmall(b []byte) []byte {
	if cap(b) > 2*maxBatch {
		return nil
	}
	return b
}

// shardMin is the fewest clients a writer hands to another core: below
// it, starting a goroutine costs more than it saves.
const shardMin = 512

// sendAll writes a batch to every fast client; those whose sockets could
// not take it at once leave the fast set. A large set is split into
// shards written in parallel, one per core at most, so that one stream's
// fan-out is not bound to one core; each client is in one shard.
func (f *fanout) sendAll(b batch, now time.Time) {
	shards := min(runtime.GOMAXPROCS(0), len(f.fast)/shardMin)
	if shards < 2 {
		kept, n := f.sendRange(f.fast, b, now)
		f.fast = f.fast[:kept]
		f.s.stats.sent(kept, n, b.tally)
		return
	}
	size := (len(f.fast) + shards - 1) / shards
	kept, sent := make([]int, shards), make([]int, shards)
	var wg sync.WaitGroup
	for i := 1; i < shards; i++ {
		part := f.fast[i*size : min((i+1)*size, len(f.fast))]
		wg.Go(func() { kept[i], sent[i] = f.sendRange(part, b, now) })
	}
	kept[0], sent[0] = f.sendRange(f.fast[:size], b, now)
	wg.Wait()
	// close the gaps the shards left
	n, bytes := kept[0], sent[0]
	for i := 1; i < shards; i++ {
		start := i * size
		n += copy(f.fast[n:], f.fast[start:start+kept[i]])
		bytes += sent[i]
	}
	clear(f.fast[n:])
	f.fast = f.fast[:n]
	f.s.stats.sent(n, bytes, b.tally)
}

// sendRange writes a batch to the clients of part, moves those that stay
// to its front, and returns how many did and the event-stream bytes they
// took. Those that left the fast set count their own.
func (f *fanout) sendRange(part []*client, b batch, now time.Time) (kept, bytes int) {
	for _, c := range part {
		p, t := b.all, b.tally
		if b.noRetry != nil && c.h.Retry > 0 {
			p, t.bytes = b.noRetry, t.bytes-b.retryBytes
		}
		if len(p) == 0 {
			c.cursor = b.next // nothing to write: no write, no keepalive reset
			part[kept] = c
			kept++
			continue
		}
		if f.send(c, p, b.shared, b.next, now, t) {
			part[kept] = c
			kept++
			bytes += t.bytes
		}
	}
	clear(part[kept:])
	return kept, bytes
}

// send writes p, which carries t, to a fast client without waiting, which
// then stands at next. It reports false when the client left the fast
// set: to a goroutine of its own with what its socket did not take (which
// counts t once it is written), or ended.
func (f *fanout) send(c *client, p []byte, shared bool, next uint64, now time.Time, t tally) bool {
	n, err := c.sock.tryWrite(p)
	c.sent += int64(n)
	c.cursor = next
	switch {
	case err == nil && n == len(p):
		c.lastWrite = now
		return true
	case err == nil || errors.Is(err, errWouldBlock):
		rest := p[n:]
		if shared {
			rest = bytes.Clone(rest) // the batch buffer is reused
		}
		metrics.directStalls.Inc()
		go c.slow(rest, t)
		return false
	default:
		c.finish(endWriteFailed)
		return false
	}
}

// merge adds a handed-over client to the fast set once it has what it
// lacked (catchUp; nil when that is more than a batch: back to its
// goroutine).
func (f *fanout) merge(c *client, catchUp []byte, t tally, now time.Time) {
	if catchUp == nil && c.cursor != f.sent {
		go c.slow(nil, tally{})
		return
	}
	if len(catchUp) > 0 {
		if !f.send(c, catchUp, false, f.sent, now, t) {
			return
		}
		f.s.stats.delivered(t)
	}
	c.cursor = f.sent
	if c.lastWrite.IsZero() {
		c.lastWrite = now
	}
	f.fast = append(f.fast, c)
}

// signals looks at the fast clients from index from on: it ends those
// that must end (hang-up, exit, drain, the stream's end) and writes
// keepalives to those idle long enough. It returns the next deadline: the
// earliest of theirs and, for the clients before from, f.due.
func (f *fanout) signals(from int, now time.Time, streamOver bool) (next time.Time) {
	if from > 0 {
		next = f.due
	}
	if from >= len(f.fast) {
		return next
	}
	s := f.s
	exit := closed(s.hub.exit)
	torn := closed(s.done) && !streamOver
	f.looked += len(f.fast) - from
	kept := f.fast[:from]
	for _, c := range f.fast[from:] {
		end := ""
		switch {
		case c.gone.Load():
			end = endClientClosed
		case exit:
			end = endExit
		case streamOver:
			end = endUpstreamEnded
		}
		if end == "" && c.endAt.IsZero() && (torn || closed(c.h.stopping)) {
			// its config is going away: it ends at its own point in the
			// drain window, like a client on its own goroutine
			c.endAt = now.Add(c.h.drainDelay())
		}
		if end == "" && !c.endAt.IsZero() && !now.Before(c.endAt) {
			end = endDrained
		}
		if end != "" {
			c.finish(end)
			continue
		}
		if ka := time.Duration(c.h.Keepalive); ka > 0 {
			due := c.lastWrite.Add(ka)
			if !now.Before(due) {
				if !f.send(c, keepaliveFrame, false, c.cursor, now, keepaliveTally) {
					continue
				}
				s.stats.wrote(keepaliveTally.bytes)
				due = now.Add(ka)
			}
			next = earliest(next, due)
		}
		if !c.endAt.IsZero() {
			next = earliest(next, c.endAt)
		}
		kept = append(kept, c)
	}
	clear(f.fast[len(kept):])
	f.fast = kept
	return next
}

// finishAll ends every fast client.
func (f *fanout) finishAll(end string) {
	for _, c := range f.fast {
		if end == endLagging {
			f.s.stats.drop(dropLagging)
		}
		c.finish(end)
	}
	clear(f.fast)
	f.fast = f.fast[:0]
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// keepaliveFrame is the keepalive comment as a chunk.
var keepaliveFrame, _ = frameOf(keepaliveComment)

// keepaliveTally is what a keepalive carries: bytes, no event.
var keepaliveTally = tally{bytes: len(keepaliveComment)}

// errWouldBlock is a write the socket could not take at once.
var errWouldBlock = errors.New("socket buffer full")

// rawSocket is a client's TCP socket after the hijack, written with one
// non-blocking write(2) per call, without the runtime's poller. The
// syscall.RawConn and its write callback are made once: making them
// allocates.
type rawSocket struct {
	tcp *net.TCPConn
	rc  syscall.RawConn
	fn  func(fd uintptr) bool
	p   []byte
	n   int
	err error
}

func newRawSocket(tcp *net.TCPConn) (*rawSocket, error) {
	if !rawwrite.Supported {
		// every client is served through net/http
		return nil, errors.New("no raw socket writes on this platform")
	}
	rc, err := tcp.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &rawSocket{tcp: tcp, rc: rc}
	s.fn = func(fd uintptr) bool {
		s.n, s.err = rawwrite.Write(fd, s.p)
		return true // done: never wait for the socket
	}
	return s, nil
}

// tryWrite writes what the socket takes now, never waiting: a short count
// with errWouldBlock means the socket's buffer is full.
func (s *rawSocket) tryWrite(p []byte) (int, error) {
	s.p = p
	err := s.rc.Write(s.fn)
	s.p = nil
	if err != nil {
		return 0, err // closed, or a write deadline passed
	}
	if s.err == syscall.EAGAIN {
		return s.n, errWouldBlock
	}
	return s.n, s.err
}
