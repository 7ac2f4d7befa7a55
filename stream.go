package ssefanout

import (
	"context"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
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

// String names the state as the admin view shows it.
func (st streamState) String() string {
	switch st {
	case stateConnecting:
		return "connecting"
	case stateLive:
		return "live"
	case stateRetrying:
		return "retrying"
	case stateFinal:
		return "final"
	}
	return "unknown"
}

// finalAnswer is a permanent origin answer passed on to waiting clients.
type finalAnswer struct {
	status int
	header http.Header
	body   []byte
	// reason is why the proxy answers 502 itself, for the logs; empty
	// for the origin's own answers, whose bodies are not logged
	reason string
}

// stream is one upstream event stream and its clients: a history of
// encoded entries that clients read from their own cursors. Publishing
// never writes to a client socket, so no client can slow the upstream or
// another client.
type stream struct {
	hub    *hub
	key    string
	name   string
	target *url.URL
	header http.Header // the vary headers sent upstream
	// initialID is the Last-Event-ID of the client that created the
	// stream: the upstream is asked to resume from it (until the origin
	// commits an id of its own), and clients that send it get the whole
	// history. It is never an id that clients receive.
	initialID string

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the upstream loop has returned
	ready  chan struct{} // closed at the origin's first answer
	// after, when set, is the done channel of the stream closed to make
	// room for this one: its upstream connects once that one is gone.
	after <-chan struct{}

	// Guarded by hub.mu.
	clients     int
	lingerTimer *time.Timer
	// lingerSince is when the last client left; the stream that has
	// lingered longest makes room when max_streams is reached.
	lingerSince time.Time

	// fan writes to the stream's fast clients.
	fan *fanout
	// stats counts what the stream does, for the status page.
	stats streamStats
	// src feeds the stream (set before it runs).
	src source

	// cuMu guards the stream's catch-ups (taken before a catch-up's own
	// lock, never while holding mu).
	cuMu        sync.Mutex
	catchUps    map[string]*catchUp // by the Last-Event-ID they ask for
	lastCatchUp time.Time

	// mu guards what follows. Lock order: hub.mu before mu; a stream
	// never takes its hub's lock while holding its own.
	mu   sync.RWMutex
	hist history
	// wake is closed and replaced by a publish when a client took it
	// since the last one (wakeTaken, set under the read lock): a stream
	// whose clients are all written by its writer allocates nothing per
	// publish
	wake       chan struct{}
	wakeTaken  atomic.Bool
	state      streamState
	final      *finalAnswer
	respHeader http.Header
	retry      int64  // the origin's latest retry in ms, when hasRetry
	hasRetry   bool   // the origin sent a retry (0 is a value)
	retryNext  uint64 // sequence number after the latest retry entry; 0 if none
	lastID     string // the origin's committed id, when hasID
	hasID      bool
}

func newStream(h *hub, key string, target *url.URL, header http.Header, initialID string, set hubSettings) *stream {
	ctx, cancel := context.WithCancel(h.ctx)
	s := &stream{
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
		hist:      newHistory(set.history, set.historyBytes),
		wake:      make(chan struct{}),
		catchUps:  map[string]*catchUp{},
	}
	s.fan = newFanout(s)
	return s
}

// stopLinger stops a pending linger timer. The caller holds hub.mu.
func (s *stream) stopLinger() {
	if s.lingerTimer != nil {
		s.lingerTimer.Stop()
		s.lingerTimer = nil
	}
}

// resize applies new history bounds, keeping the newest entries.
func (s *stream) resize(set hubSettings) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hist.resize(set.history, set.historyBytes)
}

// maxPublishWait bounds how long a publish waits for the fast clients'
// writer to make room in the history.
const maxPublishWait = time.Second

// run feeds the stream from src until the stream is closed or the origin
// gives its final answer, then takes the stream out of its hub.
func (s *stream) run() {
	defer func() {
		s.stats.live(false, false) // a live upstream ends with its stream
		s.hub.remove(s)
		close(s.done)
		s.signal() // clients see done
	}()
	if s.after != nil {
		select {
		case <-s.after:
		case <-s.ctx.Done():
			return
		}
	}
	s.src.run(s.ctx, s)
}

// append adds an entry to the history and wakes every client. It never
// writes to a client.
//
// When the history is full and the fast clients' writer has not yet sent
// its oldest entry (a burst larger than the history, read in one go), it
// waits for the writer, at most maxPublishWait: the origin is then read as
// fast as the fast clients are written, instead of all of them dropped.
func (s *stream) append(e entry) {
	e.at = monoNow()
	s.mu.Lock()
	if s.fan.blocks(len(e.frame)) {
		deadline := time.Now().Add(maxPublishWait)
		for s.fan.blocks(len(e.frame)) {
			s.mu.Unlock()
			ok := s.fan.waitProgress(deadline)
			s.mu.Lock()
			if !ok {
				break // the writer's clients will be dropped as lagging
			}
		}
	}
	s.hist.append(e)
	if e.kind == entryEvent {
		s.stats.events.Add(1)
		metrics.events.Inc()
	}
	if e.kind == entryRetry { // a retry line carries no id of its own
		s.retry, s.hasRetry = e.retry, true
		s.retryNext = s.hist.head
	} else {
		s.lastID, s.hasID = e.id, e.hasID
	}
	var wake chan struct{}
	if s.wakeTaken.Swap(false) {
		wake = s.wake
		s.wake = make(chan struct{})
	}
	s.mu.Unlock()
	if wake != nil {
		close(wake)
	}
	s.fan.wake()
}

// signal wakes every client of the stream, to look at the stream's state
// and their own.
func (s *stream) signal() {
	s.mu.Lock()
	wake := s.wake
	s.wake = make(chan struct{})
	s.mu.Unlock()
	close(wake)
	s.fan.signal()
}

// answer records how the origin answered; the first answer, whatever it
// is, releases the clients waiting for it.
func (s *stream) answer(a answer) {
	s.stats.live(a.state == stateLive, a.past)
	s.mu.Lock()
	s.state = a.state
	if a.header != nil {
		s.respHeader = a.header
	}
	if a.final != nil {
		s.final = a.final
	}
	s.mu.Unlock()
	select {
	case <-s.ready:
	default:
		close(s.ready)
	}
}

// ended reports whether the stream is over for good (the origin's final
// answer), as opposed to torn down with its hub.
func (s *stream) ended() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.state == stateFinal
}

// find returns the sequence number after the most recent entry whose block
// set id, or false when the id is not in the history.
func (s *stream) find(id string) (uint64, bool) {
	if seq, ok := s.hist.find(id); ok {
		return seq, true
	}
	if s.initialID != "" && id == s.initialID && s.hist.oldest() == 0 {
		// the client that created the stream, or one at the same point:
		// everything since the upstream resumed from its id is new to it
		return 0, true
	}
	return 0, false
}

// position returns the sequence number the next entry will have.
func (s *stream) position() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.hist.head
}
