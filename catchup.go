package ssefanout

import (
	"context"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Catch-up from the origin. A client of a live stream whose Last-Event-ID
// the history no longer holds (or never held) gets a dedicated upstream
// request with that id: its events go to the client until its ids and the
// shared stream's meet, and the client then continues on the shared stream
// right after the last id it received, never receiving an id twice. The
// two origin connections race, so the ids can meet in either order: a
// catch-up event already in the history is a splice point (the history
// has it, from there on), and so is a delivered catch-up event that the
// shared stream publishes later.
//
// Only entries that set an id are splice points, and an id the history
// holds more than once is not one. What cannot be avoided is counted as a
// gap: no slot within 2 s, a catch-up that fails, ids that do not meet
// within catch_up_timeout or catch_up_events, and an origin that answers a
// catch-up from its live head (it ignores Last-Event-ID).

// Bounds on catch-ups, so that a crowd of stale ids cannot become an
// attack on the origin.
const (
	// maxHubCatchUps is how many catch-ups one handler's streams may run
	// at once, whatever max_catch_ups allows each stream.
	maxHubCatchUps = 32
	// catchUpInterval is the least time between two new catch-ups of a
	// stream.
	catchUpInterval = time.Second
	// catchUpWait is how long a client waits for a catch-up slot before it
	// starts live.
	catchUpWait = 2 * time.Second
	// catchUpBuffer is how much of a catch-up's response is held for its
	// clients: the origin is read only as fast as they take its events.
	catchUpBuffer = 64 << 10
)

// Why a resume left a gap, as the resume_gaps_total metric counts it.
const (
	gapNotFound     = "not_found"       // unknown id and no catch-up to ask (off, assign_ids, stream not live)
	gapNoSlot       = "no_slot"         // the catch-up bounds kept it out for 2 s
	gapFailed       = "catch_up_failed" // the catch-up answered no event stream
	gapUnmet        = "unmet"           // the ids did not meet in time
	gapOriginIgnore = "origin_ignored"  // the catch-up started at the live head
)

// catchUp is one dedicated upstream request and the clients that follow it.
// It is the sink of its upstream source.
type catchUp struct {
	ctx    context.Context
	cancel context.CancelFunc
	start  time.Time

	mu      sync.Mutex
	entries []entry // from the origin, oldest first; entries[0] is number base
	base    int
	bytes   int
	readers map[*catchUpReader]bool
	done    bool // the request ended
	events  bool // it delivered at least one entry
	wake    chan struct{}
	space   chan struct{} // closed when readers took entries, for a full buffer
}

// catchUpReader is one client's position in a catch-up.
type catchUpReader struct {
	pos int
}

// answer is the catch-up's upstream reporting: a live answer lets it run;
// any other ends it (a catch-up never retries).
func (cu *catchUp) answer(a answer) {
	if a.state != stateLive {
		cu.end()
	}
}

// append holds an entry for the readers, waiting while the buffer is full
// so that the origin is read only as fast as the clients take it. Retry
// lines are left out: the clients have the shared stream's.
func (cu *catchUp) append(e entry) {
	if e.kind == entryRetry {
		return
	}
	cu.mu.Lock()
	for cu.bytes >= catchUpBuffer && cu.ctx.Err() == nil {
		space := cu.space
		cu.mu.Unlock()
		select {
		case <-space:
		case <-cu.ctx.Done():
		}
		cu.mu.Lock()
	}
	cu.entries = append(cu.entries, e)
	cu.bytes += len(e.frame)
	cu.events = true
	cu.signalLocked()
	cu.mu.Unlock()
}

// end marks the request over; readers see it once they took what is left.
func (cu *catchUp) end() {
	cu.mu.Lock()
	cu.done = true
	cu.signalLocked()
	cu.mu.Unlock()
}

func (cu *catchUp) signalLocked() {
	close(cu.wake)
	cu.wake = make(chan struct{})
}

// next returns the entries a reader has not taken, and moves it past them.
func (cu *catchUp) next(r *catchUpReader) (entries []entry, done, events bool, wake <-chan struct{}) {
	cu.mu.Lock()
	defer cu.mu.Unlock()
	entries = slices.Clone(cu.entries[r.pos-cu.base:]) // trimming clears what all took
	r.pos = cu.base + len(cu.entries)
	cu.trimLocked()
	return entries, cu.done, cu.events, cu.wake
}

// trimLocked drops the entries every reader has taken, and lets a waiting
// request read on.
func (cu *catchUp) trimLocked() {
	least := cu.base + len(cu.entries)
	for r := range cu.readers {
		least = min(least, r.pos)
	}
	n := least - cu.base
	if n == 0 {
		return
	}
	for _, e := range cu.entries[:n] {
		cu.bytes -= len(e.frame)
	}
	clear(cu.entries[:n])
	cu.entries = cu.entries[n:]
	cu.base = least
	close(cu.space)
	cu.space = make(chan struct{})
}

// leave removes a reader; the last one to leave closes the request.
func (cu *catchUp) leave(r *catchUpReader) {
	cu.mu.Lock()
	delete(cu.readers, r)
	last := len(cu.readers) == 0
	cu.trimLocked()
	cu.mu.Unlock()
	if last {
		cu.cancel()
	}
}

// joinCatchUp finds or starts the catch-up for id, within the bounds: one
// per distinct id, at most max_catch_ups per stream and maxHubCatchUps per
// handler at once, at most one new one per stream per catchUpInterval,
// only while the stream is live. A client waits up to catchUpWait for a
// slot; without one it starts live, for the reason given.
func (s *stream) joinCatchUp(id string, maxPerStream int, done <-chan struct{}) (*catchUp, *catchUpReader, string) {
	deadline := time.Now().Add(catchUpWait)
	for {
		cu, r, wait := s.tryCatchUp(id, maxPerStream)
		if cu != nil {
			return cu, r, ""
		}
		if !wait {
			return nil, nil, gapNotFound
		}
		left := time.Until(deadline)
		if left <= 0 {
			return nil, nil, gapNoSlot
		}
		t := time.NewTimer(min(left, 50*time.Millisecond))
		select {
		case <-t.C:
		case <-done:
			t.Stop()
			return nil, nil, gapNoSlot
		case <-s.ctx.Done():
			t.Stop()
			return nil, nil, gapNoSlot
		}
	}
}

// tryCatchUp joins a running catch-up for id that has held every entry
// since its start, or starts one if the bounds allow. wait says whether a
// slot may come: not for a stream that is not live.
func (s *stream) tryCatchUp(id string, maxPerStream int) (cu *catchUp, r *catchUpReader, wait bool) {
	s.mu.RLock()
	live := s.state == stateLive
	s.mu.RUnlock()
	if !live {
		return nil, nil, false
	}
	s.cuMu.Lock()
	defer s.cuMu.Unlock()
	r = &catchUpReader{}
	if cu := s.catchUps[id]; cu != nil {
		cu.mu.Lock()
		joinable := cu.base == 0 && !cu.done && len(cu.readers) > 0
		if joinable {
			cu.readers[r] = true
		}
		cu.mu.Unlock()
		if joinable {
			return cu, r, true
		}
		return nil, nil, true
	}
	h := s.hub
	if len(s.catchUps) >= maxPerStream || time.Since(s.lastCatchUp) < catchUpInterval || h.catchUps.Load() >= maxHubCatchUps {
		return nil, nil, true
	}
	ctx, cancel := context.WithCancel(s.ctx)
	cu = &catchUp{
		ctx: ctx, cancel: cancel, start: time.Now(),
		readers: map[*catchUpReader]bool{r: true},
		wake:    make(chan struct{}), space: make(chan struct{}),
	}
	s.catchUps[id] = cu
	s.lastCatchUp = cu.start
	s.stats.catchUps.Add(1)
	h.catchUps.Add(1)
	src := s.upstreamFrom(id, sourceCatchUp)
	src.once = true
	go func() {
		defer func() {
			cu.end()
			s.cuMu.Lock()
			if s.catchUps[id] == cu {
				delete(s.catchUps, id)
			}
			s.cuMu.Unlock()
			h.catchUps.Add(-1)
		}()
		src.run(ctx, cu)
	}()
	if ce := h.current().logger.Check(zapcore.DebugLevel, "catch-up from the origin started"); ce != nil {
		ce.Write(zap.String("stream", s.name), zap.Int("id_length", len(id)))
	}
	return cu, r, true
}

// followCatchUp serves the client from its catch-up until the ids meet
// and it can continue on the shared stream: it returns with the client's
// cursor set there, or why the client ended.
func (c *client) followCatchUp(cu *catchUp, r *catchUpReader, done <-chan struct{}) (end string) {
	defer cu.leave(r)
	s, h := c.s, c.h
	// the ids must meet within catch_up_timeout of the catch-up's start
	timeout := time.NewTimer(time.Until(cu.start.Add(time.Duration(h.CatchUpTimeout))))
	defer timeout.Stop()
	delivered, ids := 0, 0
	var firstID, lastID string
	// spliced counts the resume, and tells an origin that ignored
	// Last-Event-ID: a catch-up whose first id the shared stream published
	// after the client arrived started from the live head, not after the
	// client's id (which the history had evicted before it arrived)
	spliced := func() {
		if seq, ok := s.findUnique(firstID); ok && seq-1 >= c.arrived {
			c.gap(gapOriginIgnore)
			return
		}
		s.stats.resume(resumeCatchUp)
	}
	for {
		entries, over, events, wake := cu.next(r)
		for i := range entries {
			e := &entries[i]
			if e.setsID {
				if ids == 0 {
					firstID = e.id
				}
				if seq, ok := s.findUnique(e.id); ok {
					// the history has this entry: go on from it there
					spliced()
					c.cursor = seq - 1
					return ""
				}
			}
			p := c.bytesOf(e)
			if err := c.write(p); err != nil {
				return writeEnd(err)
			}
			var t tally
			t.count(e)
			t.at = 0 // not published live: no lag to sample
			s.stats.delivered(t)
			delivered++
			if e.setsID {
				lastID = e.id
				ids++
			}
		}
		// the catch-up may be ahead: the shared stream publishes what it
		// delivered later
		if ids > 0 {
			if seq, ok := s.findUnique(lastID); ok {
				spliced()
				c.cursor = seq
				return ""
			}
		}
		switch {
		case over && !events:
			// nothing delivered: live from where it arrived
			return c.startLive(gapFailed)
		case delivered >= h.CatchUpEvents:
			c.cursor = s.position()
			return c.startLive(gapUnmet)
		}
		if over {
			wake = nil // nothing more from the origin; the shared stream may still meet it
		}
		s.mu.RLock()
		shared := s.wake
		s.wakeTaken.Store(true)
		s.mu.RUnlock()
		select {
		case <-wake:
		case <-shared:
		case <-timeout.C:
			c.cursor = s.position()
			return c.startLive(gapUnmet)
		case <-done:
			return endClientClosed
		case <-s.done:
			c.cursor = s.position()
			return ""
		case <-s.hub.exit:
			return endExit
		}
	}
}

// bytesOf is an entry's bytes as this client's writes carry them.
func (c *client) bytesOf(e *entry) []byte {
	if c.sock != nil {
		return e.frame
	}
	return e.payload()
}

// gap counts a resume that could not give the client everything after its
// Last-Event-ID.
func (c *client) gap(reason string) {
	c.s.stats.resume(resumeLive)
	metrics.resumeGaps.WithLabelValues(reason).Inc()
	if ce := c.h.logger.Check(zapcore.DebugLevel, "resume with a gap: the client continues live"); ce != nil {
		ce.Write(zap.String("stream", c.s.name), zap.String("reason", reason))
	}
}

// findUnique returns the sequence number after the one entry of the
// history that set id, if exactly one did: an id held twice is no splice
// point.
func (s *stream) findUnique(id string) (uint64, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.hist.findUnique(id)
}
