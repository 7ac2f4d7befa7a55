package ssefanout

import (
	"context"
	"errors"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
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
func (h *Handler) serveClient(w http.ResponseWriter, r *http.Request, s *stream, arrived uint64, last lastID) error {
	ctx := r.Context()
	if !h.awaitFirstAnswer(ctx, s) {
		return nil
	}
	c := &client{h: h, s: s, w: w, rc: http.NewResponseController(w)}
	prelude, respHeader, final := c.start(last, arrived)
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
func (c *client) start(last lastID, arrived uint64) (prelude []byte, respHeader http.Header, final *finalAnswer) {
	s, h := c.s, c.h
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.state == stateFinal {
		return nil, nil, s.final
	}
	found := false
	if last.set {
		c.cursor, found = s.find(last.id)
		if found {
			metrics.resumes.WithLabelValues("history").Inc()
		} else {
			metrics.resumes.WithLabelValues("live").Inc()
			if ce := h.logger.Check(zapcore.DebugLevel, "Last-Event-ID not in history, client starts live"); ce != nil {
				ce.Write(zap.String("stream", s.name), zap.Int("id_length", len(last.id)))
			}
		}
	}
	if !found {
		// what was published while the client waited for the origin's
		// first answer is live to it, not history
		c.cursor = min(s.hist.replayStart(h.Replay), arrived)
	}
	var pre []byte
	// the origin's latest retry line, when still ahead of the cursor,
	// reaches the client from the history anyway
	if retry, ok := h.retryMillis(s); ok && (h.Retry > 0 || s.retryNext <= c.cursor) {
		pre = appendRetry(pre, retry)
	}
	// a client resumed at the head already has the committed id
	if !found && c.cursor == s.hist.head && s.hasID {
		pre = appendIDBlock(pre, s.lastID)
	}
	return pre, s.respHeader, nil
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
func (c *client) collect(buf **[]byte, skipRetry bool) (out []byte, coalesced bool, next uint64, wake <-chan struct{}, behind lag) {
	s := c.s
	s.mu.RLock()
	defer s.mu.RUnlock()
	wake = s.wake
	behind = s.hist.behind(c.cursor)
	if behind == lagEvicted {
		return nil, false, c.cursor, wake, behind
	}
	out, coalesced, next = s.hist.collect(c.cursor, buf, skipRetry)
	return out, coalesced, next, wake, behind
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
		d := h.drainDelay()
		if d == 0 {
			return false
		}
		drainTimer = time.NewTimer(d)
		drain = drainTimer.C
		return true
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
		out, coalesced, next, wake, behind := c.collect(&bufp, skipRetry)
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
			if !startDrain() {
				return
			}
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
		if closed(s.done) {
			if s.ended() {
				return // the origin's final answer: all was sent
			}
			// the stream was torn down with its hub (its config went
			// away): the upstream is gone, but the client ends in the
			// drain window like any client of a reloaded config, and
			// resumes on the new config's hub by Last-Event-ID
			if drain == nil && !startDrain() {
				return
			}
			wake = nil // closed for good: nothing more will be published
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
