package ssefanout

import (
	"context"
	"errors"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// maxBatch bounds one write to a client, so that a client catching up on a
// large history holds at most this much memory of its own, and so that a
// slow client's lag is checked at least every 64 KiB it takes in (a write
// blocks as long as the client takes to read it). It matches Caddy's
// default max_write_chunk.
const maxBatch = 64 << 10

// batchPool holds the buffers used to coalesce several entries into one
// write.
var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}

// Why a client's stream ended, for the log of hijacked streams.
const (
	endClientClosed  = "client closed"
	endWriteFailed   = "write failed"
	endWriteTimeout  = "write_timeout"
	endLagging       = "lagging"
	endDrained       = "config reloaded"
	endExit          = "server stopping"
	endUpstreamEnded = "upstream ended"
)

// client is one downstream connection's view of a stream. It is served
// either through net/http (its ResponseWriter) or, on the fast path, on
// its own socket after the hijack: by its stream's writer while it is
// caught up, by its own goroutine otherwise.
type client struct {
	h      *Handler
	s      *stream
	cursor uint64
	// deadline is the write deadline in force, and timeout how long a
	// write may stay blocked: write_timeout, capped by the server's
	// write_idle_timeout where the client's writes pass beneath it.
	deadline time.Time
	timeout  time.Duration
	// idleGuard, for HTTP/2 clients, fires shortly before the deadline,
	// to clear it if the client is still idle then (see clearWhenIdle).
	idleGuard *time.Timer
	// endAt, once its config stops, is its point in the drain window.
	endAt time.Time

	// The net/http path. logEnd: its writes pass beneath Caddy's access
	// log recorder, so its end is logged like a hijacked stream's.
	w      http.ResponseWriter
	rc     *http.ResponseController
	logEnd bool

	// The fast path, after the hijack.
	sock      *rawSocket
	hangup    chan struct{} // closed when the peer hung up
	gone      atomic.Bool
	unwatch   func()
	lastWrite time.Time // for keepalives while its stream's writer has it

	// For the log of a stream whose end is the module's to log: since the
	// hijack, or since its writes passed beneath the access log.
	started time.Time
	sent    int64

	// unknown is the client's Last-Event-ID when the history lacks it:
	// the client is caught up from the origin before its loop, or starts
	// live with a gap.
	unknown lastID
	// arrived is the stream's head when the client arrived.
	arrived uint64
}

// serveClient runs a client's stream until it, its stream, its config or
// the process ends, or hands it to its stream's writer (the fast path):
// handedOff then says that the client is no longer this request's.
func (h *Handler) serveClient(w http.ResponseWriter, r *http.Request, s *stream, arrived uint64, last lastID) (handedOff bool) {
	ctx := r.Context()
	if !s.fan.yieldToPass(ctx) || !h.awaitFirstAnswer(ctx, s) {
		return false
	}
	c := &client{h: h, s: s, w: w, rc: http.NewResponseController(w), timeout: time.Duration(h.WriteTimeout)}
	prelude, respHeader, final := c.start(last, arrived)
	if final != nil {
		writeFinal(w, final)
		return false
	}
	if r.ProtoMajor == 2 {
		// see clearWhenIdle; armed by the first write's deadline
		c.idleGuard = time.NewTimer(time.Hour)
		c.idleGuard.Stop()
		defer c.idleGuard.Stop()
	}
	hdr := w.Header()
	for name, vals := range respHeader {
		hdr[name] = slices.Clone(vals) // later handlers may edit them in place
	}
	setStreamHeaders(hdr)
	w.WriteHeader(http.StatusOK)
	// flush the head even with no prelude, so that EventSource opens now
	if err := c.write(prelude); err != nil {
		return false
	}
	s.stats.wrote(len(prelude))
	if c.hijack(r) {
		c.runOwn()
		return true
	}
	if inner, bound, skippedLog := streamWriter(w, c.timeout); inner != nil {
		// the next write sets a deadline of the new bound
		c.w, c.rc, c.timeout, c.deadline = inner, http.NewResponseController(inner), bound, time.Time{}
		c.logEnd, c.started = skippedLog, time.Now()
	}
	end := c.loop(ctx.Done())
	if c.logEnd {
		h.logStreamEnd(c, end)
	}
	// the deadline of the last write may have passed while the stream
	// was idle; give net/http's final flush a fresh one
	_ = c.rc.SetWriteDeadline(time.Now().Add(time.Duration(h.WriteTimeout)))
	return false
}

// hijack takes a plaintext HTTP/1.1 client's connection over after its
// response head, when its socket can be reached (see socketOf): from then
// on its bytes are the entries' pre-framed chunks, written to the socket.
// It reports false, changing nothing, when the client stays on the
// net/http path (TLS, HTTP/2 and 3, HTTP/1.0, wrappers that change what is
// written, a response being encoded).
func (c *client) hijack(r *http.Request) bool {
	if r.ProtoMajor != 1 || r.ProtoMinor < 1 || c.w.Header().Get("Content-Encoding") != "" {
		return false
	}
	sock := socketOf(r.Context())
	if sock.tcp == nil || !sock.plain {
		return false
	}
	raw, err := newRawSocket(sock.tcp)
	if err != nil {
		return false
	}
	// the net.Conn and buffers that Hijack returns are dropped: the
	// socket is reached directly, and Caddy's wrapper counts bytes for
	// an access log entry that is written when the handler returns
	if _, _, err := c.rc.Hijack(); err != nil {
		return false
	}
	c.sock, c.hangup, c.started, c.deadline = raw, make(chan struct{}), time.Now(), time.Time{}
	// the response (and through it net/http's connection with its 8 KiB
	// of buffers, the request and Caddy's per-request state) is no longer
	// this client's: keeping it would hold all of that per client
	c.w, c.rc = nil, nil
	c.s.hub.hijacked.Add(1)
	metrics.directClients.Inc()
	stop, err := watchHangup(sock.tcp, c.onHangup)
	if err != nil {
		c.finish("cannot watch for hang-ups: " + err.Error())
		return true
	}
	c.unwatch = stop
	return true
}

// onHangup is called once when a hijacked client's peer closed or reset
// the connection: its current writer ends it.
func (c *client) onHangup() {
	c.gone.Store(true)
	close(c.hangup)
	c.s.fan.signal()
}

// runOwn serves a hijacked client on the current goroutine until it is
// caught up, then hands it to its stream's writer; or ends it.
func (c *client) runOwn() {
	if end := c.loop(c.hangup); end != "" {
		c.finish(end)
	}
}

// slow takes a hijacked client back from its stream's writer when its
// socket did not take a write at once: it finishes the partly written
// bytes, then serves it from its cursor like any client.
func (c *client) slow(pending []byte, t tally) {
	if len(pending) > 0 {
		if err := c.write(pending); err != nil {
			c.finish(writeEnd(err))
			return
		}
		c.s.stats.delivered(t)
	}
	c.runOwn()
}

// finish ends a hijacked client: a clean end of stream when its socket
// takes it, the socket closed, the client detached from its stream, and
// the end logged. Only the client's current writer calls it.
func (c *client) finish(end string) {
	if c.unwatch != nil {
		c.unwatch()
	}
	if end != endClientClosed && end != endWriteFailed && end != endWriteTimeout {
		n, _ := c.sock.tryWrite(lastChunk)
		c.sent += int64(n)
	}
	_ = c.sock.tcp.Close()
	c.s.hub.detach(c.s)
	c.s.hub.hijacked.Add(-1)
	metrics.directClients.Dec()
	c.h.logStreamEnd(c, end)
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
func (c *client) start(last lastID, arrived uint64) (prelude []byte, respHeader http.Header, final *finalAnswer) {
	s, h := c.s, c.h
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.state == stateFinal {
		return nil, nil, s.final
	}
	c.arrived = arrived
	found := false
	if last.set {
		c.cursor, found = s.find(last.id)
		if found {
			s.stats.resume(resumeHistory)
		} else {
			// caught up from the origin, or live with a gap: decided
			// by its loop, which may have to wait for a slot
			c.unknown = last
		}
	}
	if !found {
		// what was published while the client waited for the origin's
		// first answer, or for a pass (see yieldToPass), is live to it,
		// not history. A burst meanwhile may have evicted the place it
		// arrived at: having had no byte, it starts at the oldest entry
		// kept, not as a client lagging from the start.
		c.cursor = min(h.replayStart(s), max(arrived, s.hist.oldest()))
	}
	var pre []byte
	// the origin's latest retry line, when still ahead of the cursor,
	// reaches the client from the history anyway
	if retry, ok := h.retryMillis(s); ok && (h.Retry > 0 || s.retryNext <= c.cursor) {
		pre = appendRetry(pre, retry)
	}
	// a client starting at the head gets the committed id, so that it
	// can resume before its first event (one to be caught up gets its
	// ids from the catch-up)
	if !found && !c.unknown.set && c.cursor == s.hist.head && s.hasID {
		pre = appendIDBlock(pre, s.lastID)
	}
	// while the origin is down or silent, a first comment at once: an
	// empty body until the first keepalive is what some intermediaries
	// and clients time out on
	if s.state != stateLive && c.cursor == s.hist.head {
		pre = append(pre, keepaliveComment...)
	}
	return pre, s.respHeader, nil
}

// replayStart is where a new client without Last-Event-ID starts: replay
// events back, or replay_since back in time, whichever reaches further.
// The caller holds s.mu.
func (h *Handler) replayStart(s *stream) uint64 {
	start := s.hist.replayStart(h.Replay)
	if h.ReplaySince > 0 {
		start = min(start, s.hist.sinceStart(monoNow()-int64(h.ReplaySince)))
	}
	return start
}

// retryMillis is the reconnection time to send clients: the handler's
// override, else the origin's, if it sent one. The caller holds s.mu.
func (h *Handler) retryMillis(s *stream) (int64, bool) {
	if h.Retry > 0 {
		return time.Duration(h.Retry).Milliseconds(), true
	}
	return s.retry, s.hasRetry
}

// collect gathers what the client has not been sent yet (see
// history.collect), how far behind it is, and the channel that the next
// publish closes.
func (c *client) collect(buf **[]byte, skipRetry bool) (b collected, wake <-chan struct{}, behind lag) {
	s := c.s
	s.mu.RLock()
	defer s.mu.RUnlock()
	wake = s.wake
	s.wakeTaken.Store(true)
	behind = s.hist.behind(c.cursor)
	if behind == lagEvicted {
		return collected{next: c.cursor}, wake, behind
	}
	return s.hist.collect(c.cursor, buf, skipRetry, c.sock != nil), wake, behind
}

// loop writes the stream to the client as it grows, with keepalives when
// it is idle, until something ends it (it returns why), or, for a
// hijacked client, until it is caught up: it then hands the client to its
// stream's writer and returns "".
//
// It waits on as few channels as it can: thousands of clients wait on the
// same wake channel, and a select locks every channel it waits on. The
// rarer signals shared by all clients (the upstream ended, the config is
// stopping, the process exits) close the wake channel too, and are polled
// after each wake-up without taking a lock.
func (c *client) loop(done <-chan struct{}) (end string) {
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
	var guard <-chan time.Time
	if c.idleGuard != nil {
		guard = c.idleGuard.C
	}
	var drain <-chan time.Time
	var drainTimer *time.Timer
	defer func() {
		if drainTimer != nil {
			drainTimer.Stop()
		}
	}()
	stopping := h.stopping
	// startDrain ends the client at a random point of the drain window,
	// so that thousands of EventSources don't reconnect in one instant;
	// it reports false when the client must end now
	startDrain := func() bool {
		stopping = nil
		if c.endAt.IsZero() {
			c.endAt = time.Now().Add(h.drainDelay())
		}
		d := time.Until(c.endAt)
		if d <= 0 {
			return false
		}
		drainTimer = time.NewTimer(d)
		drain = drainTimer.C
		return true
	}
	if !c.endAt.IsZero() && !startDrain() { // handed back while draining
		return endDrained
	}
	if c.unknown.set {
		if end := c.resume(done); end != "" {
			return end
		}
	}
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
		b, wake, behind := c.collect(&bufp, skipRetry)
		out, next := b.out, b.next
		// a client that fell far behind is dropped while its resume point
		// is still in the history; one that starts far behind (a resume or
		// a long replay) is let catch up, as dropping it would only bring
		// it back to the same point
		if behind == lagEvicted || (behind == lagFar && caughtUp) {
			s.stats.drop(dropLagging)
			c.debug("client too far behind, disconnecting")
			return endLagging
		}
		caughtUp = caughtUp || behind == lagNone
		// checked on every pass, as a busy client may never be idle
		switch {
		case closed(s.hub.exit):
			return endExit
		case drain != nil && closed(drain):
			return endDrained
		case stopping != nil && closed(stopping):
			if !startDrain() {
				return endDrained
			}
		}
		if len(out) > 0 {
			err := c.write(out)
			if err == nil {
				t := b.tally
				if c.cursor < c.arrived {
					// replayed or resumed from the history: published
					// before the client came, no delivery lag to sample
					t.at = 0
				}
				s.stats.delivered(t)
			}
			if b.coalesced {
				if cap(out) <= 2*maxBatch {
					*bufp = out[:0] // keep a grown buffer
				}
				batchPool.Put(bufp)
				bufp = nil
			}
			if err != nil {
				return writeEnd(err)
			}
			c.cursor = next
			if ka != nil {
				ka.Reset(keepalive)
			}
			continue
		}
		c.cursor = next
		if closed(s.done) {
			if s.ended() {
				return endUpstreamEnded // the origin's final answer: all was sent
			}
			// the stream was torn down with its hub (its config went
			// away): the upstream is gone, but the client ends in the
			// drain window like any client of a reloaded config, and
			// resumes on the new config's hub by Last-Event-ID
			if drain == nil && !startDrain() {
				return endDrained
			}
			wake = nil // closed for good: nothing more will be published
		} else if c.sock != nil {
			// caught up: the stream's writer takes it from here, with
			// one non-blocking write per event
			if c.handBack() {
				return ""
			}
		}
		select {
		case <-wake:
		case <-guard:
			c.setWriteDeadline(time.Time{}) // clearWhenIdle
		case <-kaC:
			if err := c.write(c.keepalive()); err != nil {
				return writeEnd(err)
			}
			s.stats.wrote(len(keepaliveComment))
			ka.Reset(keepalive)
		case <-drain:
			return endDrained
		case <-done:
			return endClientClosed
		}
	}
}

// resume serves a client whose Last-Event-ID the history lacks: from a
// catch-up, until it splices onto the shared stream, or live from where it
// arrived with a gap counted when no catch-up can be had.
func (c *client) resume(done <-chan struct{}) (end string) {
	id := c.unknown.id
	c.unknown = lastID{}
	h, s := c.h, c.s
	if cs, ok := s.src.(*clusterSource); ok {
		// another node's holder may have published it: wait until this
		// node's history has what the log had when the client came
		cs.awaitApplied(time.Second)
		s.mu.RLock()
		seq, found := s.find(id)
		s.mu.RUnlock()
		if found {
			s.stats.resume(resumeHistory)
			c.cursor = seq
			return ""
		}
	}
	if h.MaxCatchUps < 0 || s.hub.assignIDs {
		return c.startLive(gapNotFound)
	}
	cu, r, reason := s.joinCatchUp(id, h.MaxCatchUps, done)
	if cu == nil {
		return c.startLive(reason)
	}
	return c.followCatchUp(cu, r, done)
}

// startLive counts a resume gap and sends the client the committed id, as
// a client starting live gets it.
func (c *client) startLive(reason string) (end string) {
	c.gap(reason)
	s := c.s
	s.mu.RLock()
	var idBlock []byte
	if c.cursor == s.hist.head && s.hasID {
		idBlock = appendIDBlock(nil, s.lastID)
	}
	s.mu.RUnlock()
	if idBlock == nil {
		return ""
	}
	n := len(idBlock)
	if c.sock != nil {
		idBlock, _ = frameOf(idBlock)
	}
	if err := c.write(idBlock); err != nil {
		return writeEnd(err)
	}
	s.stats.wrote(n)
	return ""
}

// handBack gives a caught-up hijacked client to its stream's writer. The
// socket's write deadline is cleared first: the writer's writes never
// block, and a passed deadline would fail them.
func (c *client) handBack() bool {
	if err := c.sock.tcp.SetWriteDeadline(time.Time{}); err != nil {
		return false
	}
	c.deadline = time.Time{}
	c.lastWrite = time.Now()
	c.s.fan.adopt(c)
	return true
}

// writeEnd names why a write ended a client.
func writeEnd(err error) string {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return endWriteTimeout
	}
	return endWriteFailed
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

// keepalive is the keepalive comment as this client's writes carry it.
func (c *client) keepalive() []byte {
	if c.sock != nil {
		return keepaliveFrame
	}
	return keepaliveComment
}

// write sends p to the client, failing if the write stays blocked for
// write_timeout: on a hijacked socket as one chunk or more (p is framed);
// through net/http with a flush (the head alone when p is empty).
func (c *client) write(p []byte) error {
	// the deadline is moved only once a quarter of write_timeout has been
	// used: setting it costs more than the write on a busy stream, and a
	// blocked write is still cut after 3/4 to all of write_timeout
	timeout := c.timeout
	if now := time.Now(); c.deadline.Sub(now) < timeout-timeout/4 {
		c.setWriteDeadline(now.Add(timeout))
	}
	if c.sock != nil {
		n, err := c.sock.tcp.Write(p)
		c.sent += int64(n)
		if err != nil {
			c.writeFailed(err)
		}
		return err
	}
	if len(p) > 0 {
		n, err := c.w.Write(p)
		c.sent += int64(n)
		if err != nil {
			c.writeFailed(err)
			return err
		}
	}
	if err := c.rc.Flush(); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			c.s.stats.drop(dropWriteTimeout) // buffered writes time out here
		}
		c.debug("flush to client failed")
		return err
	}
	return nil
}

func (c *client) writeFailed(err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.s.stats.drop(dropWriteTimeout)
	}
	c.debug("write to client failed")
}

func (c *client) setWriteDeadline(t time.Time) {
	c.deadline = t
	if c.sock != nil {
		_ = c.sock.tcp.SetWriteDeadline(t)
		return
	}
	_ = c.rc.SetWriteDeadline(t)
	c.clearWhenIdle(t)
}

// clearWhenIdle arms an HTTP/2 client's idle guard for the deadline t:
// HTTP/2 resets a stream whose write deadline passes even with no write
// under way, so the deadline is cleared shortly before it passes if the
// client is idle then. On a busy stream the guard only moves with the
// deadline, once per quarter of the timeout; over HTTP/1 and HTTP/3 a
// passed deadline only fails the next write, which moves it first.
func (c *client) clearWhenIdle(t time.Time) {
	if c.idleGuard == nil {
		return
	}
	if t.IsZero() {
		c.idleGuard.Stop()
		return
	}
	c.idleGuard.Reset(time.Until(t) - c.timeout/4)
}

func (c *client) debug(msg string) {
	if ce := c.h.logger.Check(zapcore.DebugLevel, msg); ce != nil {
		ce.Write(zap.String("stream", c.s.name))
	}
}

// logStreamEnd logs the end of a hijacked stream, whose access log entry
// Caddy wrote at the hijack: at info level where the server keeps access
// logs, at debug level otherwise.
func (h *Handler) logStreamEnd(c *client, end string) {
	level := zapcore.DebugLevel
	if h.server != nil && h.server.Logs != nil {
		level = zapcore.InfoLevel
	}
	if ce := h.logger.Check(level, "stream ended"); ce != nil {
		ce.Write(zap.String("stream", c.s.name), zap.Int("status", http.StatusOK), zap.Int64("bytes", c.sent),
			zap.Duration("duration", time.Since(c.started)), zap.String("reason", end))
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
