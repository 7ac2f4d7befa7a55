package ssefanout

// entryKind says what a history entry is.
type entryKind uint8

const (
	entryEvent entryKind = iota
	entryID
	entryRetry
)

// entry is one encoded item of a stream's history, framed once as the
// HTTP/1.1 chunk that fast-path clients get; clients served through
// net/http get its payload. Its bytes never change once published.
type entry struct {
	// frame is the whole chunk: hex size, CRLF, payload, CRLF.
	frame []byte
	// id is the committed last-event ID after this entry.
	id string
	// retry is a retry line's value in ms (entryRetry).
	retry int64
	// at is when the entry was published (monoNow).
	at int64
	// off is the stream's byte count before this entry, to measure how far
	// behind a client is in bytes.
	off uint64
	// hdr is where the payload starts in frame.
	hdr uint8
	// setsID says whether this entry's own block had an id field; hasID
	// whether the stream has committed one at all by then.
	setsID bool
	hasID  bool
	kind   entryKind
}

// payload is the entry's event-stream bytes, without the chunk framing.
func (e *entry) payload() []byte { return e.frame[e.hdr : len(e.frame)-2] }

// minRingSlots is the ring's first allocation once it holds anything.
const minRingSlots = 16

// history is a stream's recent entries: a ring addressed by sequence
// number, bounded by a count and by the bytes of the entries it holds.
// Its slots grow by doubling with what it holds, up to the count bound,
// so that an empty or quiet stream costs little whatever `history` is:
// memory follows content, not configuration.
//
// It is guarded by its stream's lock: a client's start reads it and takes
// its cursor under one lock.
type history struct {
	ring     []entry
	limit    int    // the most entries it keeps (`history`)
	maxBytes int64  // the most bytes of entries it keeps (`history_bytes`)
	head     uint64 // sequence number of the next entry
	count    int
	bytes    int64  // bytes held by the entries in the ring
	total    uint64 // bytes ever appended
}

func newHistory(limit int, maxBytes int64) history {
	return history{limit: limit, maxBytes: maxBytes}
}

// oldest returns the sequence number of the oldest entry held.
func (h *history) oldest() uint64 { return h.head - uint64(h.count) }

// at returns the entry with sequence number seq, which must be held.
func (h *history) at(seq uint64) *entry { return &h.ring[seq%uint64(len(h.ring))] }

// append adds an entry at the head, evicting the oldest entries first so
// that it fits both bounds. An entry larger than maxBytes is kept alone.
func (h *history) append(e entry) {
	h.evict(len(e.frame))
	if h.count == len(h.ring) {
		h.relayout(min(max(2*len(h.ring), minRingSlots), h.limit))
	}
	e.off = h.total
	*h.at(h.head) = e
	h.head++
	h.count++
	h.bytes += int64(len(e.frame))
	h.total += uint64(len(e.frame))
}

// full reports whether appending an entry of size bytes must first drop
// the oldest entry.
func (h *history) full(size int) bool {
	return h.count > 0 && (h.count >= h.limit || h.bytes+int64(size) > h.maxBytes)
}

// evict drops the oldest entries until one of size more fits.
func (h *history) evict(size int) {
	for h.full(size) {
		h.dropOldest()
	}
}

func (h *history) dropOldest() {
	e := h.at(h.oldest())
	h.bytes -= int64(len(e.frame))
	*e = entry{}
	h.count--
}

// relayout moves the entries held into a ring of n slots (n >= count).
// Clients hold sequence numbers, not slots, so they are unaffected.
func (h *history) relayout(n int) {
	old := h.ring
	h.ring = make([]entry, n)
	for seq := h.oldest(); seq < h.head; seq++ {
		h.ring[seq%uint64(n)] = old[seq%uint64(len(old))]
	}
}

// resize applies new bounds, keeping the newest entries.
func (h *history) resize(limit int, maxBytes int64) {
	h.limit, h.maxBytes = limit, maxBytes
	for h.count > 0 && (h.count > h.limit || h.bytes > h.maxBytes) {
		h.dropOldest()
	}
	if len(h.ring) > h.limit {
		h.relayout(h.limit)
	}
}

// find returns the sequence number after the most recent entry whose block
// set id, or false when the id is not held.
func (h *history) find(id string) (uint64, bool) {
	for seq := h.head; seq > h.oldest(); seq-- {
		if e := h.at(seq - 1); e.setsID && e.id == id {
			return seq, true
		}
	}
	return 0, false
}

// findUnique returns the sequence number after the one entry that set id,
// if exactly one held entry did: an id held twice is no splice point.
func (h *history) findUnique(id string) (uint64, bool) {
	var found uint64
	n := 0
	for seq := h.head; seq > h.oldest(); seq-- {
		if e := h.at(seq - 1); e.setsID && e.id == id {
			found = seq
			if n++; n > 1 {
				return 0, false
			}
		}
	}
	return found, n == 1
}

// sinceStart returns the sequence number of the oldest held entry
// published at or after t (the head when none was).
func (h *history) sinceStart(t int64) uint64 {
	seq := h.head
	for seq > h.oldest() && h.at(seq-1).at >= t {
		seq--
	}
	return seq
}

// replayStart returns the sequence number n events back from the head.
func (h *history) replayStart(n int) uint64 {
	seq := h.head
	for n > 0 && seq > h.oldest() {
		seq--
		if h.at(seq).kind == entryEvent {
			n--
		}
	}
	return seq
}

// lag is how far a client is behind its stream's head.
type lag uint8

const (
	lagNone    lag = iota
	lagFar         // more than 3/4 of the history behind
	lagEvicted     // its next entry is no longer held
)

// behind says how far back a client whose next entry is cursor is:
// evicted when that entry is gone, far when it is more than 3/4 of the
// history back, in entries or bytes (and more than one entry: with a tiny
// history, or an event near history_bytes, every client is one behind at
// each publish). 3/4 leaves the client's own last entry held, so a client
// dropped then resumes by Last-Event-ID with no gap.
func (h *history) behind(cursor uint64) lag {
	switch {
	case cursor == h.head:
		return lagNone
	case cursor < h.oldest():
		return lagEvicted
	}
	n := h.head - cursor
	if n > 1 && (n*4 > uint64(h.limit)*3 || (h.total-h.at(cursor).off)*4 > uint64(h.maxBytes)*3) {
		return lagFar
	}
	return lagNone
}

// collect gathers what a client at cursor has not been sent yet, from
// cursor to the head, and the cursor after it: the entries' chunk frames
// when framed (a client whose socket is written directly), else their
// payloads. A single pending entry is returned as it is (its bytes are
// immutable, so nothing is copied); several are coalesced, up to maxBatch
// bytes, into *buf (borrowed from batchPool when nil), and coalesced is
// true. With skipRetry, retry lines are left out (the handler sends its
// own). The cursor must be held.
func (h *history) collect(cursor uint64, buf **[]byte, skipRetry, framed bool) (b collected) {
	bytesOf := (*entry).payload
	if framed {
		bytesOf = func(e *entry) []byte { return e.frame }
	}
	b.next = cursor
	if cursor == h.head {
		return b
	}
	if h.head-cursor == 1 {
		e := h.at(cursor)
		b.next = h.head
		if skipRetry && e.kind == entryRetry {
			return b
		}
		b.out = bytesOf(e)
		b.count(e)
		return b
	}
	if *buf == nil {
		*buf = batchPool.Get().(*[]byte)
	}
	b.out, b.coalesced = (**buf)[:0], true
	for ; cursor < h.head && len(b.out) < maxBatch; cursor++ {
		e := h.at(cursor)
		if skipRetry && e.kind == entryRetry {
			continue
		}
		b.out = append(b.out, bytesOf(e)...)
		b.count(e)
	}
	b.next = cursor
	return b
}

// collected is what collect gathered for a client.
type collected struct {
	out       []byte
	coalesced bool   // out is a borrowed batch buffer
	next      uint64 // the cursor after out
	tally
}

// tally is what a write carries, for the stream's counters: its events,
// its event-stream bytes (without chunk framing, so that every protocol
// counts alike) and when its first event was published (monoNow).
type tally struct {
	events, bytes int
	at            int64
}

// count adds an entry written.
func (t *tally) count(e *entry) {
	t.bytes += len(e.payload())
	if e.kind != entryEvent {
		return
	}
	if t.events == 0 {
		t.at = e.at
	}
	t.events++
}

// frames returns a copy of the frames of the entries from cursor up to to,
// and their tally, or nil when they are more than maxBatch bytes (or none
// is held). With skipRetry, retry lines are left out.
func (h *history) frames(cursor, to uint64, skipRetry bool) (out []byte, t tally) {
	if cursor < h.oldest() || to > h.head {
		return nil, t
	}
	n := 0
	for seq := cursor; seq < to; seq++ {
		n += len(h.at(seq).frame)
	}
	if n > maxBatch {
		return nil, t
	}
	out = make([]byte, 0, n)
	for seq := cursor; seq < to; seq++ {
		if e := h.at(seq); !skipRetry || e.kind != entryRetry {
			out = append(out, e.frame...)
			t.count(e)
		}
	}
	return out, t
}
