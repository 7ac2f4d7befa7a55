package ssefanout

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// streamState is where a stream's upstream stands.
type streamState uint8

const (
	// stateConnecting: the first upstream attempt has no answer yet.
	stateConnecting streamState = iota
	// stateLive: an event-stream response is being read.
	stateLive
	// stateRetrying: the upstream is between attempts after a passing
	// failure; clients get a 200 stream with keepalives meanwhile.
	stateRetrying
	// stateFinal: the origin gave a permanent answer; the stream is over.
	stateFinal
)

// entryKind says what a history entry is.
type entryKind uint8

const (
	entryEvent entryKind = iota
	entryID
	entryRetry
)

// entry is one encoded item of a stream's history. Its wire bytes are
// written to clients as they are and never change once published.
type entry struct {
	wire []byte
	// id is the committed last-event ID after this entry.
	id     string
	setsID bool
	kind   entryKind
	// off is the stream's byte count before this entry, to measure how far
	// behind a client is in bytes.
	off uint64
}

// finalAnswer is a permanent origin answer passed on to waiting clients.
type finalAnswer struct {
	status int
	header http.Header
	body   []byte
}

// stream is one upstream event stream and its clients: a history ring of
// encoded entries that clients read from their own cursors. Publishing
// never writes to a client socket, so no client can slow the upstream or
// another client.
type stream struct {
	hub    *hub
	key    string
	name   string
	target *url.URL
	header http.Header // the vary headers sent upstream
	// initialID is the Last-Event-ID of the client that created the stream;
	// the upstream is asked to resume from it, and clients that send it
	// get the whole history.
	initialID string

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the upstream loop has returned
	ready  chan struct{} // closed at the origin's first answer

	// Guarded by hub.mu.
	clients     int
	lingerTimer *time.Timer

	mu         sync.RWMutex
	ring       []entry
	head       uint64 // sequence number of the next entry
	count      int
	bytes      int64  // bytes held by the entries in the ring
	total      uint64 // bytes ever published
	maxBytes   int64
	wake       chan struct{} // closed and replaced on every publish
	state      streamState
	final      *finalAnswer
	respHeader http.Header
	retry      int64  // the origin's retry in ms; 0 when it sent none
	retryNext  uint64 // sequence number after the latest retry entry; 0 if none
	lastID     string
	hasID      bool
}

func newStream(h *hub, key string, target *url.URL, header http.Header, initialID string, set hubSettings) *stream {
	ctx, cancel := context.WithCancel(h.ctx)
	return &stream{
		hub:       h,
		key:       key,
		name:      keyHash(key),
		target:    target,
		header:    header,
		initialID: initialID,
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		ready:     make(chan struct{}),
		ring:      make([]entry, set.history),
		maxBytes:  set.historyBytes,
		wake:      make(chan struct{}),
		lastID:    initialID,
		hasID:     initialID != "",
	}
}

// stopLinger stops a pending linger timer. The caller holds hub.mu.
func (s *stream) stopLinger() {
	if s.lingerTimer != nil {
		s.lingerTimer.Stop()
		s.lingerTimer = nil
	}
}

// resize applies new history bounds, keeping the newest entries. Clients
// hold sequence numbers, not ring positions, so they are unaffected.
func (s *stream) resize(set hubSettings) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.maxBytes = set.historyBytes
	if set.history != len(s.ring) {
		old, oldCap := s.ring, uint64(len(s.ring))
		for s.count > set.history {
			s.dropOldest(old, oldCap)
		}
		s.ring = make([]entry, set.history)
		for seq := s.head - uint64(s.count); seq < s.head; seq++ {
			s.ring[seq%uint64(len(s.ring))] = old[seq%oldCap]
		}
	}
	for s.count > 0 && s.bytes > s.maxBytes {
		s.dropOldest(s.ring, uint64(len(s.ring)))
	}
}

func (s *stream) dropOldest(ring []entry, capacity uint64) {
	i := (s.head - uint64(s.count)) % capacity
	s.bytes -= int64(len(ring[i].wire))
	ring[i] = entry{}
	s.count--
}

// evict drops the oldest entries until an entry of size more fits.
func (s *stream) evict(size int) {
	capacity := uint64(len(s.ring))
	for s.count > 0 && (s.count >= len(s.ring) || s.bytes+int64(size) > s.maxBytes) {
		s.dropOldest(s.ring, capacity)
	}
}

// publish appends an entry to the history and wakes every client.
func (s *stream) publish(kind entryKind, wire []byte, id string, setsID, hasID bool) {
	s.mu.Lock()
	s.evict(len(wire))
	s.ring[s.head%uint64(len(s.ring))] = entry{wire: wire, id: id, setsID: setsID, kind: kind, off: s.total}
	s.head++
	s.count++
	s.bytes += int64(len(wire))
	s.total += uint64(len(wire))
	if kind == entryRetry { // a retry line carries no id of its own
		s.retryNext = s.head
	} else {
		s.lastID, s.hasID = id, hasID
	}
	wake := s.wake
	s.wake = make(chan struct{})
	s.mu.Unlock()
	close(wake)
}

// signal wakes every client of the stream, to look at the stream's state
// and their own.
func (s *stream) signal() {
	s.mu.Lock()
	wake := s.wake
	s.wake = make(chan struct{})
	s.mu.Unlock()
	close(wake)
}

// setState records where the upstream stands; the first answer, whatever
// it is, releases the clients waiting for it.
func (s *stream) setState(st streamState, respHeader http.Header, final *finalAnswer) {
	s.mu.Lock()
	s.state = st
	if respHeader != nil {
		s.respHeader = respHeader
	}
	if final != nil {
		s.final = final
	}
	s.mu.Unlock()
	select {
	case <-s.ready:
	default:
		close(s.ready)
	}
}

// setRetry records the origin's reconnection time.
func (s *stream) setRetry(ms int64) {
	s.mu.Lock()
	s.retry = ms
	s.mu.Unlock()
}

// find returns the sequence number after the most recent entry whose block
// set id, or false when the id is not in the history.
func (s *stream) find(id string) (uint64, bool) {
	capacity := uint64(len(s.ring))
	oldest := s.head - uint64(s.count)
	for seq := s.head; seq > oldest; seq-- {
		e := &s.ring[(seq-1)%capacity]
		if e.setsID && e.id == id {
			return seq, true
		}
	}
	if s.initialID != "" && id == s.initialID && oldest == 0 {
		// the client that created the stream, or one at the same point:
		// everything since the upstream resumed from its id is new to it
		return 0, true
	}
	return 0, false
}

// replayStart returns the sequence number n events back from the head.
func (s *stream) replayStart(n int) uint64 {
	capacity := uint64(len(s.ring))
	oldest := s.head - uint64(s.count)
	seq := s.head
	for n > 0 && seq > oldest {
		seq--
		if s.ring[seq%capacity].kind == entryEvent {
			n--
		}
	}
	return seq
}

// maxBatch bounds one write to a client, so that a client catching up on a
// large history holds at most this much memory of its own, and so that a
// slow client's lag is checked at least every 64 KiB it takes in (a write
// blocks as long as the client takes to read it). It matches Caddy's
// default max_write_chunk.
const maxBatch = 64 << 10

// batchPool holds the buffers used to coalesce several entries into one
// write.
var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

// collect gathers what a client at cursor has not been sent yet. A single
// pending entry is returned as it is (its bytes are immutable); several are
// coalesced, up to maxBatch, into *buf (borrowed from batchPool when nil),
// and coalesced is true. behind says
// how far back the client is: evicted when its next entry is gone from the
// history, farBehind when it is more than 3/4 of the history back, in
// entries or bytes (and more than one entry). 3/4 leaves the client's own
// last entry in the history, so a client dropped then resumes by
// Last-Event-ID with no gap.
func (s *stream) collect(cursor uint64, buf **[]byte, skipRetry bool) (out []byte, coalesced bool, next uint64, wake <-chan struct{}, behind lag) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	wake = s.wake
	if cursor == s.head {
		return nil, false, cursor, wake, lagNone
	}
	capacity := uint64(len(s.ring))
	if cursor < s.head-uint64(s.count) {
		return nil, false, cursor, wake, lagEvicted
	}
	behind = lagNone
	if n := s.head - cursor; n > 1 && (n*4 > capacity*3 || (s.total-s.ring[cursor%capacity].off)*4 > uint64(s.maxBytes)*3) {
		// one entry behind is never far: with a tiny history, or an
		// event near history_bytes, every client is one behind at each
		// publish
		behind = lagFar
	}
	if s.head-cursor == 1 {
		e := &s.ring[cursor%capacity]
		if skipRetry && e.kind == entryRetry {
			return nil, false, s.head, wake, behind
		}
		return e.wire, false, s.head, wake, behind
	}
	if *buf == nil {
		*buf = batchPool.Get().(*[]byte)
	}
	out = (**buf)[:0]
	for ; cursor < s.head && len(out) < maxBatch; cursor++ {
		e := &s.ring[cursor%capacity]
		if skipRetry && e.kind == entryRetry {
			continue
		}
		out = append(out, e.wire...)
	}
	return out, true, cursor, wake, behind
}

// lag is how far a client is behind its stream's head.
type lag uint8

const (
	lagNone    lag = iota
	lagFar         // more than 3/4 of the history behind
	lagEvicted     // its next entry is no longer in the history
)

// client is one downstream connection's view of a stream.
type client struct {
	h      *Handler
	s      *stream
	w      http.ResponseWriter
	rc     *http.ResponseController
	cursor uint64
	// deadline is the write deadline in force.
	deadline time.Time
}

// serveClient runs a client's stream until it, its stream, its config or
// the process ends.
func (h *Handler) serveClient(w http.ResponseWriter, r *http.Request, s *stream, arrived uint64, lastID string, hasLastID bool) error {
	ctx := r.Context()
	if !h.awaitFirstAnswer(ctx, s) {
		return nil
	}
	c := &client{h: h, s: s, w: w, rc: http.NewResponseController(w)}
	prelude, respHeader, final := c.start(lastID, hasLastID, arrived)
	if final != nil {
		writeFinal(w, final)
		return nil
	}
	hdr := w.Header()
	for name, vals := range respHeader {
		hdr[name] = slices.Clone(vals) // later handlers may edit them in place
	}
	setStreamHeaders(hdr)
	w.WriteHeader(http.StatusOK)
	// flush the head even with no prelude, so that EventSource opens now
	if err := c.write(prelude); err == nil {
		c.loop(ctx)
	}
	// the deadline of the last write may have passed while the stream
	// was idle; give net/http's final flush a fresh one
	_ = c.rc.SetWriteDeadline(time.Now().Add(time.Duration(h.WriteTimeout)))
	return nil
}

// awaitFirstAnswer holds a new stream's first clients until the origin
// answers or status_wait runs out, so that a 404 or 204 reaches them as
// sent. It reports false if the client went away meanwhile.
func (h *Handler) awaitFirstAnswer(ctx context.Context, s *stream) bool {
	select {
	case <-s.ready:
		return true
	default:
	}
	t := time.NewTimer(time.Duration(h.StatusWait))
	defer t.Stop()
	select {
	case <-s.ready:
	case <-t.C:
	case <-s.done:
	case <-ctx.Done():
		return false
	}
	return true
}

// start positions the client's cursor and builds what it gets first: the
// retry in force, then the events it missed (by Last-Event-ID), or the
// replay, or an id-only block so that it can resume even before its first
// event. It also returns the origin's headers to pass on, or the origin's
// permanent answer, read under the same lock.
func (c *client) start(lastID string, hasLastID bool, arrived uint64) (prelude []byte, respHeader http.Header, final *finalAnswer) {
	s, h := c.s, c.h
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.state == stateFinal {
		return nil, nil, s.final
	}
	found := false
	if hasLastID {
		c.cursor, found = s.find(lastID)
		if found {
			metrics.resumes.WithLabelValues("history").Inc()
		} else {
			metrics.resumes.WithLabelValues("live").Inc()
			if ce := h.logger.Check(zapcore.DebugLevel, "Last-Event-ID not in history, client starts live"); ce != nil {
				ce.Write(zap.String("stream", s.name), zap.Int("id_length", len(lastID)))
			}
		}
	}
	if !found {
		// what was published while the client waited for the origin's
		// first answer is live to it, not history
		c.cursor = min(s.replayStart(h.Replay), arrived)
	}
	var pre []byte
	// the origin's latest retry line, when still ahead of the cursor,
	// reaches the client from the history anyway
	if retry := h.retryMillis(s.retry); retry > 0 && (h.Retry > 0 || s.retryNext <= c.cursor) {
		pre = appendRetry(pre, retry)
	}
	// a client resumed at the head already has the committed id
	if !found && c.cursor == s.head && s.hasID {
		pre = appendIDBlock(pre, s.lastID)
	}
	return pre, s.respHeader, nil
}

// position returns the sequence number the next entry will have.
func (s *stream) position() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.head
}

// retryMillis is the reconnection time to send clients: the handler's
// override, else the origin's.
func (h *Handler) retryMillis(origin int64) int64 {
	if h.Retry > 0 {
		return time.Duration(h.Retry).Milliseconds()
	}
	return origin
}

// loop writes the stream to the client as it grows, with keepalives when
// it is idle, until something ends it.
//
// It waits on as few channels as it can: thousands of clients wait on the
// same wake channel, and a select locks every channel it waits on. The
// rarer signals shared by all clients (the upstream ended, the config is
// stopping, the process exits) close the wake channel too, and are polled
// after each wake-up without taking a lock.
func (c *client) loop(ctx context.Context) {
	h, s := c.h, c.s
	skipRetry := h.Retry > 0
	keepalive := time.Duration(h.Keepalive)
	var ka *time.Timer
	var kaC <-chan time.Time
	if keepalive > 0 {
		ka = time.NewTimer(keepalive)
		defer ka.Stop()
		kaC = ka.C
	}
	done := ctx.Done() // once: a request context is a chain of values
	var drain <-chan time.Time
	stopping := h.stopping
	// a batch buffer is borrowed only while several entries are coalesced,
	// so an idle client holds none
	var bufp *[]byte
	defer func() {
		if bufp != nil {
			batchPool.Put(bufp)
		}
	}()
	caughtUp := false
	for {
		out, coalesced, next, wake, behind := s.collect(c.cursor, &bufp, skipRetry)
		// a client that fell far behind is dropped while its resume point
		// is still in the history; one that starts far behind (a resume or
		// a long replay) is let catch up, as dropping it would only bring
		// it back to the same point
		if behind == lagEvicted || (behind == lagFar && caughtUp) {
			metrics.clientsDropped.WithLabelValues("lagging").Inc()
			c.debug("client too far behind, disconnecting")
			return
		}
		caughtUp = caughtUp || behind == lagNone
		// checked on every pass, as a busy client may never be idle
		switch {
		case closed(s.hub.exit):
			return
		case drain != nil && closed(drain):
			return
		case stopping != nil && closed(stopping):
			stopping = nil
			d := h.drainDelay()
			if d == 0 {
				return
			}
			t := time.NewTimer(d)
			defer t.Stop()
			drain = t.C
		}
		if len(out) > 0 {
			err := c.write(out)
			if coalesced {
				if cap(out) <= 2*maxBatch {
					*bufp = out[:0] // keep a grown buffer
				}
				batchPool.Put(bufp)
				bufp = nil
			}
			if err != nil {
				return
			}
			c.cursor = next
			if ka != nil {
				ka.Reset(keepalive)
			}
			continue
		}
		c.cursor = next
		if closed(s.done) { // the upstream ended for good, all was sent
			return
		}
		// HTTP/2 resets a stream whose write deadline passes even with no
		// write under way: clear it unless a keepalive comes first
		if !c.deadline.IsZero() && (keepalive <= 0 || keepalive >= time.Until(c.deadline)) {
			_ = c.rc.SetWriteDeadline(time.Time{})
			c.deadline = time.Time{}
		}
		select {
		case <-wake:
		case <-kaC:
			if err := c.write(keepaliveComment); err != nil {
				return
			}
			ka.Reset(keepalive)
		case <-drain:
			return
		case <-done:
			return
		}
	}
}

// closed reports whether ch is closed (or, for a timer, has fired),
// without blocking or locking it when it is open and empty.
func closed[T any](ch <-chan T) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

var keepaliveComment = appendComment(nil, "keepalive")

// write sends p to the client and flushes it (the head alone when p is
// empty), failing if the write stays blocked for write_timeout.
func (c *client) write(p []byte) error {
	// the deadline is moved only once a quarter of write_timeout has been
	// used: setting it costs more than the write on a busy stream, and a
	// blocked write is still cut after 3/4 to all of write_timeout
	timeout := time.Duration(c.h.WriteTimeout)
	if now := time.Now(); c.deadline.Sub(now) < timeout-timeout/4 {
		c.deadline = now.Add(timeout)
		_ = c.rc.SetWriteDeadline(c.deadline)
	}
	if len(p) > 0 {
		if _, err := c.w.Write(p); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				metrics.clientsDropped.WithLabelValues("write_timeout").Inc()
			}
			c.debug("write to client failed")
			return err
		}
	}
	if err := c.rc.Flush(); err != nil {
		c.debug("flush to client failed")
		return err
	}
	return nil
}

func (c *client) debug(msg string) {
	if ce := c.h.logger.Check(zapcore.DebugLevel, msg); ce != nil {
		ce.Write(zap.String("stream", c.s.name))
	}
}

// writeFinal passes a permanent origin answer on as the origin sent it.
func writeFinal(w http.ResponseWriter, f *finalAnswer) {
	hdr := w.Header()
	for name, vals := range f.header {
		hdr[name] = slices.Clone(vals)
	}
	if f.status != http.StatusNoContent {
		hdr.Set("Content-Length", strconv.Itoa(len(f.body)))
	}
	w.WriteHeader(f.status)
	if f.status != http.StatusNoContent {
		_, _ = w.Write(f.body)
	}
}
