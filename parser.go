package ssefanout

import (
	"bytes"
	"math"
	"strings"
	"unicode/utf8"
)

// recordKind says what a parser record reports.
type recordKind uint8

const (
	recEvent   recordKind = iota + 1 // a dispatched event (the block's data buffer was non-empty)
	recID                            // a block with an id field but no data: commits the id, dispatches nothing
	recRetry                         // a valid retry field, reported when its line is read
	recComment                       // a comment line (liveness only)
	recSkipped                       // a block that grew past the bound was skipped; reported at its blank line
)

// record is one thing the parser found. Its byte slices are only valid during the emit callback.
type record struct {
	kind   recordKind
	typ    []byte // event type as sent; empty means "message" (recEvent)
	data   []byte // event data with the one trailing LF removed (recEvent)
	id     string // the committed last-event ID after this block (recEvent, recID, recSkipped)
	hasID  bool   // the stream has committed an id at least once (incl. an initial id from setLastEventID), so encoders must write `id:` explicitly even when empty
	setsID bool   // this block itself had a (valid, NUL-free) id field
	retry  int64  // reconnection time in ms, saturated at math.MaxInt64 (recRetry)
	size   int64  // bytes of the skipped block that were discarded (recSkipped), at least approximately
}

const (
	// parserDefaultMaxEventSize is the bound newParser uses when given none.
	parserDefaultMaxEventSize = 1 << 20

	// maxFieldNameLen is the length of the longest field name that means
	// something ("event", "retry"). A longer name cannot be a known field, so
	// its line is dropped as it streams instead of being buffered.
	maxFieldNameLen = 5

	// minParserBufCap keeps small buffers from growing a few bytes at a time.
	minParserBufCap = 64

	// maxFieldLen bounds an event type and an id value, in bytes: a
	// block with a longer one is skipped, like an event over
	// max_event_size, so that no client is left holding an id the proxy
	// did not relay.
	maxFieldLen = 4 << 10
)

// maxRetained is the most capacity the parser's buffers hold with bound
// maxEventSize: the data with its trailing LF, a type, and the block's
// pending id with the id value being read.
func maxRetained(maxEventSize int) int { return maxEventSize + 1 + maxFieldLen + 2*maxFieldLen }

// utf8BOM is the byte order mark a response may start with.
var utf8BOM = [3]byte{0xEF, 0xBB, 0xBF}

// replacementChar is U+FFFD in UTF-8, written once per maximal invalid subpart.
var replacementChar = []byte("\uFFFD")

// lfByte terminates every value appended to the data buffer.
var lfByte = []byte{'\n'}

// lineState says which part of a line the parser is in. Lines can be cut
// anywhere by chunk boundaries, so this survives between feed calls.
type lineState uint8

const (
	inLineStart  lineState = iota // nothing of the line read yet
	inName                        // reading the field name
	inValueStart                  // colon read; one space may follow and is dropped
	inValue                       // reading the value of a known field
	inComment                     // inside a comment; reported at its end
	inIgnored                     // inside a line nobody needs; dropped as it streams
)

// sseField names the field whose value is being read.
type sseField uint8

const (
	sseData sseField = iota + 1
	sseEvent
	sseID
	sseRetry
)

// utf8Tail holds the start of a UTF-8 sequence that a chunk boundary cut,
// so that it decodes exactly as if it had arrived whole.
type utf8Tail struct {
	buf    [3]byte
	n      uint8 // bytes held
	need   uint8 // length of the sequence they start
	lo, hi byte  // range the next byte must fall in to continue it
}

// parser is a streaming text/event-stream parser following WHATWG HTML
// §9.2.5–9.2.6. It buffers at most one block and reports what it finds
// through the emit callback given to feed.
//
// Its bound is on the event's data as dispatched (MessageEvent.data, in
// UTF-8 bytes): an event with exactly maxEventSize bytes of data passes,
// one with more is skipped without being buffered. The type and the id
// have a small bound of their own (maxFieldLen): a block with a longer one
// is skipped too, and such an id is not committed. Its buffers never
// hold more than maxRetained(maxEventSize) bytes of capacity; besides them
// it keeps the committed last-event ID and a few bytes of line state.
type parser struct {
	max int // bound on an event's data as dispatched

	// Response state: restarts with each upstream response.
	bomSeen int8 // bytes of a leading BOM matched so far; -1 once the check is over
	lastCR  bool // the previous chunk ended with CR, so a leading LF is part of that line end

	// Line state.
	state   lineState
	name    [maxFieldNameLen]byte
	nameLen int
	field   sseField
	tail    utf8Tail
	retry   int64 // value of a retry field so far
	retryOK bool  // the retry value read so far is all digits
	retryN  int   // digits read
	idStart int   // where the id value being read starts in idBuf
	idBad   bool  // the id value being read contains NUL or does not fit: ignore it

	// Block state: restarts after each blank line.
	data   []byte // data buffer, each value followed by LF
	typ    []byte // event type buffer
	idBuf  []byte // this block's pending id, then the id value being read
	setsID bool   // idBuf[:idStart] holds a valid id field of this block
	// idTooLong says the block had an id over maxFieldLen: it is skipped,
	// even without data, and commits none of its ids
	idTooLong bool
	hasData   bool  // the block had a data field, even if skipped
	skipping  bool  // the block outgrew the bound; its data and type are dropped
	skipped   int64 // raw bytes of data and event values in the block

	// Stream state: survives reset.
	committed string // last event ID string
	hasID     bool   // an id has been committed at least once

	rec record // reused for every emit so that reporting does not allocate
}

// newParser returns a parser that skips any event whose data is longer
// than maxEventSize bytes. A bound of zero or less means
// parserDefaultMaxEventSize.
func newParser(maxEventSize int) *parser {
	if maxEventSize <= 0 {
		maxEventSize = parserDefaultMaxEventSize
	}
	return &parser{max: maxEventSize}
}

// reset prepares the parser for a new upstream response: the BOM check, the
// CR state and any half-read line or block start over. A half-read block is
// discarded without committing its id, as at the end of a stream; the id
// committed so far is kept.
func (p *parser) reset() {
	p.bomSeen = 0
	p.lastCR = false
	p.state = inLineStart
	p.tail.n = 0
	p.resetBlock()
}

// setMaxEventSize changes the bound, between responses (after reset).
// Buffers grown past a lower bound are let go, so the bound on retained
// memory holds.
func (p *parser) setMaxEventSize(n int) {
	if n <= 0 {
		n = parserDefaultMaxEventSize
	}
	p.max = n
	if p.retained() > maxRetained(n) || cap(p.data) > n+1 {
		p.data, p.typ, p.idBuf = nil, nil, nil
	}
}

// setLastEventID sets the committed id, for a stream resumed with a client's
// Last-Event-ID. An id no stream could have sent (with NUL, CR or LF) is
// ignored; invalid UTF-8 is replaced as the parser would.
func (p *parser) setLastEventID(id string) {
	if strings.ContainsAny(id, "\x00\r\n") {
		return
	}
	if !utf8.ValidString(id) {
		id = string(appendValidUTF8(nil, []byte(id)))
	}
	p.committed = id
	if id != "" {
		p.hasID = true
	}
}

// lastEventID returns the committed last-event ID.
func (p *parser) lastEventID() string { return p.committed }

// retained returns the capacity of the parser's growable buffers, which
// maxRetained caps.
func (p *parser) retained() int { return cap(p.data) + cap(p.typ) + cap(p.idBuf) }

// feed parses the next chunk of a response. Chunks may be cut anywhere. emit
// is called for each record found; the record and its slices are only valid
// during the call.
func (p *parser) feed(chunk []byte, emit func(*record)) {
	if emit == nil {
		emit = func(*record) {}
	}
	if p.bomSeen >= 0 {
		chunk = p.skipBOM(chunk, emit)
	}
	p.scan(chunk, emit)
}

// skipBOM drops one leading U+FEFF of a response, even when cut across
// chunks. Bytes held back that turn out not to be a BOM are parsed as input.
func (p *parser) skipBOM(chunk []byte, emit func(*record)) []byte {
	for p.bomSeen < int8(len(utf8BOM)) && len(chunk) > 0 {
		if chunk[0] != utf8BOM[p.bomSeen] {
			n := p.bomSeen
			p.bomSeen = -1
			p.scan(utf8BOM[:n], emit)
			return chunk
		}
		p.bomSeen++
		chunk = chunk[1:]
	}
	if p.bomSeen == int8(len(utf8BOM)) {
		p.bomSeen = -1
	}
	return chunk
}

// scan splits chunk into line pieces. The next CR and LF positions are
// remembered so that each byte is searched once, however the line ends mix.
func (p *parser) scan(chunk []byte, emit func(*record)) {
	nextLF, nextCR := -1, -1
	for i := 0; i < len(chunk); {
		if p.lastCR {
			p.lastCR = false
			if chunk[i] == '\n' {
				i++
				continue
			}
		}
		if nextLF < i {
			nextLF = indexByteFrom(chunk, i, '\n')
		}
		if nextCR < i {
			nextCR = indexByteFrom(chunk, i, '\r')
		}
		end := min(nextLF, nextCR)
		if end == len(chunk) {
			p.piece(chunk[i:], false, emit)
			return
		}
		p.piece(chunk[i:end], true, emit)
		p.lastCR = chunk[end] == '\r'
		i = end + 1
	}
}

// indexByteFrom returns the index of c in b at or after i, or len(b).
func indexByteFrom(b []byte, i int, c byte) int {
	if j := bytes.IndexByte(b[i:], c); j >= 0 {
		return i + j
	}
	return len(b)
}

// piece parses seg, the next part of the current line; eol says the line
// ends after it.
func (p *parser) piece(seg []byte, eol bool, emit func(*record)) {
	if p.state == inLineStart {
		if len(seg) == 0 {
			if eol {
				p.dispatch(emit)
			}
			return
		}
		p.nameLen = 0
		p.state = inName
		if seg[0] == ':' {
			p.state = inComment
		}
	}
	if p.state == inName {
		seg = p.readName(seg, eol)
	}
	if p.state == inValueStart && len(seg) > 0 {
		if seg[0] == ' ' {
			seg = seg[1:]
		}
		p.state = inValue
	}
	if p.state == inValue || p.state == inValueStart {
		p.readValue(seg, eol, emit)
	}
	if eol {
		if p.state == inComment {
			p.emit(emit, recComment)
		}
		p.state = inLineStart
	}
}

// readName collects the field name and returns what follows its colon. A
// line without a colon is a field with an empty value.
func (p *parser) readName(seg []byte, eol bool) []byte {
	// Names are short: a loop beats a call to bytes.IndexByte here.
	room := len(p.name) - p.nameLen
	colon := -1
	for i := 0; i < len(seg) && i <= room; i++ {
		if seg[i] == ':' {
			colon = i
			break
		}
	}
	n := colon
	if colon < 0 {
		n = len(seg)
	}
	if n > room {
		p.state = inIgnored
		return nil
	}
	if colon >= 0 && p.nameLen == 0 {
		// The whole name is in seg: no need to copy it.
		p.beginValue(seg[:colon])
		return seg[colon+1:]
	}
	p.nameLen += copy(p.name[p.nameLen:], seg[:n])
	if colon < 0 {
		if eol {
			p.beginValue(p.name[:p.nameLen])
		}
		return nil
	}
	p.beginValue(p.name[:p.nameLen])
	return seg[colon+1:]
}

// beginValue picks the field for name and readies its value.
func (p *parser) beginValue(name []byte) {
	p.state = inValueStart
	p.tail.n = 0
	switch string(name) {
	case "data":
		p.field = sseData
		p.hasData = true
	case "event":
		p.field = sseEvent
		p.typ = p.typ[:0]
	case "id":
		p.field = sseID
		p.idBad = false
		if !p.setsID {
			p.idBuf = p.idBuf[:0]
		}
		p.idStart = len(p.idBuf)
	case "retry":
		p.field = sseRetry
		p.retry, p.retryOK, p.retryN = 0, true, 0
	default:
		p.state = inIgnored
	}
}

// readValue takes the next part of a known field's value; eol says it is the
// last part.
func (p *parser) readValue(seg []byte, eol bool, emit func(*record)) {
	switch p.field {
	case sseData:
		p.skipped += int64(len(seg))
		if eol {
			p.skipped++
		}
		if p.skipping {
			return
		}
		if _, ok := p.appendText(&p.data, seg, eol); !ok {
			p.skip()
			return
		}
		if eol && !p.put(&p.data, lfByte) {
			p.skip()
		}
	case sseEvent:
		p.skipped += int64(len(seg))
		if p.skipping {
			return
		}
		if _, ok := p.appendText(&p.typ, seg, eol); !ok {
			p.skip()
		}
	case sseID:
		p.readID(seg, eol)
	case sseRetry:
		p.readRetry(seg, eol, emit)
	}
}

// readID buffers an id value after the block's pending id, so that a value
// found to contain NUL can be dropped and the pending id kept, as the spec
// ignores such a field.
func (p *parser) readID(seg []byte, eol bool) {
	if !p.idBad {
		text, final, nul := seg, eol, false
		if i := bytes.IndexByte(seg, 0); i >= 0 {
			// The bytes before the NUL count against the bound as they
			// would had they come in a chunk of their own, so that where
			// chunks are cut cannot change whether the block overflows.
			text, final, nul = seg[:i], false, true
		}
		_, ok := p.appendText(&p.idBuf, text, final)
		if !ok {
			// An id longer than its bound cannot be kept, nor can its
			// block be relayed as the origin meant it: the block is
			// skipped, and its id not committed.
			p.skip()
			p.idTooLong = true
		}
		p.idBad = nul || !ok
	}
	if p.idBad {
		p.idBuf = p.idBuf[:p.idStart]
	}
	if !eol {
		return
	}
	if !p.idBad {
		n := copy(p.idBuf, p.idBuf[p.idStart:])
		p.idBuf = p.idBuf[:n]
		p.setsID = true
	}
	p.idStart = len(p.idBuf)
}

// readRetry accumulates a retry value, which must be all ASCII digits and is
// reported as soon as its line ends.
func (p *parser) readRetry(seg []byte, eol bool, emit func(*record)) {
	for _, c := range seg {
		if !p.retryOK {
			break
		}
		if c < '0' || c > '9' {
			p.retryOK = false
			break
		}
		p.retryN++
		d := int64(c - '0')
		if p.retry > (math.MaxInt64-d)/10 {
			p.retry = math.MaxInt64
		} else {
			p.retry = p.retry*10 + d
		}
	}
	if eol && p.retryOK && p.retryN > 0 {
		p.emit(emit, recRetry)
	}
}

// dispatch handles a blank line: commit the id buffer, then report the block.
func (p *parser) dispatch(emit func(*record)) {
	if p.idTooLong {
		p.hasData, p.setsID = true, false // reported as skipped
	}
	if p.setsID {
		if string(p.idBuf) != p.committed {
			p.committed = string(p.idBuf)
		}
		p.hasID = true
	}
	switch {
	case p.hasData && p.skipping:
		p.emit(emit, recSkipped)
	case p.hasData:
		p.emit(emit, recEvent)
	case p.setsID:
		p.emit(emit, recID)
	}
	p.resetBlock()
}

// resetBlock empties the block buffers, keeping their capacity for reuse.
func (p *parser) resetBlock() {
	p.data = p.data[:0]
	p.typ = p.typ[:0]
	p.idBuf = p.idBuf[:0]
	p.idStart = 0
	p.setsID = false
	p.idTooLong = false
	p.hasData = false
	p.skipping = false
	p.skipped = 0
}

// skip gives up buffering the block's data and type; its id is still kept.
func (p *parser) skip() {
	p.skipping = true
	p.data = p.data[:0]
	p.typ = p.typ[:0]
}

// emit fills the shared record and passes it on.
func (p *parser) emit(emit func(*record), kind recordKind) {
	r := &p.rec
	*r = record{kind: kind, id: p.committed, hasID: p.hasID}
	switch kind {
	case recEvent:
		r.typ = p.typ
		r.data = p.data[:len(p.data)-1]
		r.setsID = p.setsID
	case recID:
		r.setsID = true
	case recSkipped:
		r.setsID = p.setsID
		r.size = p.skipped
	case recRetry:
		r.retry = p.retry
	}
	emit(r)
}

// limit is how many bytes a block buffer may hold: the data with its
// trailing LF, a type, or the pending id with the id value being read.
func (p *parser) limit(buf *[]byte) int {
	switch buf {
	case &p.data:
		return p.max + 1
	case &p.typ:
		return maxFieldLen
	}
	return p.idStart + maxFieldLen // the id value after the block's pending id
}

// put appends b to one of the block buffers, or reports false if it would
// outgrow its bound.
func (p *parser) put(buf *[]byte, b []byte) bool {
	if len(*buf)+len(b) > p.limit(buf) {
		return false
	}
	if cap(*buf)-len(*buf) < len(b) {
		p.grow(buf, len(b))
	}
	*buf = append(*buf, b...)
	return true
}

// grow makes room for n more bytes in buf within its bound, which put has
// checked.
func (p *parser) grow(buf *[]byte, n int) {
	b := *buf
	need := len(b) + n
	c := min(max(2*cap(b), need, minParserBufCap), p.limit(buf))
	nb := make([]byte, len(b), c)
	copy(nb, b)
	*buf = nb
}

// appendText appends src to buf as UTF-8 decode would read it: invalid bytes
// become U+FFFD, one per maximal invalid subpart, and a sequence cut at the
// end of src waits in p.tail unless final. If the bound is hit it returns
// false and the unconsumed input, so the caller may retry it.
func (p *parser) appendText(buf *[]byte, src []byte, final bool) ([]byte, bool) {
	t := &p.tail
	for t.n > 0 && len(src) > 0 {
		c := src[0]
		if c < t.lo || c > t.hi {
			if !p.put(buf, replacementChar) {
				return src, false
			}
			t.n = 0
			break
		}
		if t.n+1 < t.need {
			t.buf[t.n] = c
			t.n++
			t.lo, t.hi = 0x80, 0xBF
			src = src[1:]
			continue
		}
		var seq [4]byte
		n := copy(seq[:], t.buf[:t.n])
		seq[n] = c
		if !p.put(buf, seq[:n+1]) {
			return src, false
		}
		t.n = 0
		src = src[1:]
	}
	if t.n > 0 {
		if final {
			if !p.put(buf, replacementChar) {
				return src, false
			}
			t.n = 0
		}
		return src, true
	}
	if utf8.Valid(src) {
		if !p.put(buf, src) {
			return src, false
		}
		return nil, true
	}
	return p.appendInvalid(buf, src, final)
}

// appendInvalid is appendText's slow path for input with invalid bytes.
func (p *parser) appendInvalid(buf *[]byte, src []byte, final bool) ([]byte, bool) {
	for len(src) > 0 {
		if n := utf8ValidPrefix(src); n > 0 {
			if !p.put(buf, src[:n]) {
				return src, false
			}
			src = src[n:]
			continue
		}
		k, need, lo, hi := utf8InvalidPrefix(src)
		if k == len(src) && need > 0 && !final {
			t := &p.tail
			t.n = uint8(copy(t.buf[:], src))
			t.need, t.lo, t.hi = uint8(need), lo, hi
			return nil, true
		}
		if !p.put(buf, replacementChar) {
			return src, false
		}
		src = src[k:]
	}
	return nil, true
}

// utf8ValidPrefix returns the length of the longest prefix of b made of
// whole, valid UTF-8 sequences.
func utf8ValidPrefix(b []byte) int {
	i := 0
	for i < len(b) {
		if b[i] < utf8.RuneSelf {
			i++
			continue
		}
		r, size := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && size == 1 {
			break
		}
		i += size
	}
	return i
}

// utf8InvalidPrefix measures the maximal subpart at the start of b, which
// does not begin with a valid sequence: it returns its length k. If b ends before
// the sequence could be judged, need is the sequence's full length and lo/hi
// the range its next byte must fall in; otherwise need is 0. The ranges are
// those of the Encoding Standard's UTF-8 decoder.
func utf8InvalidPrefix(b []byte) (k, need int, lo, hi byte) {
	lo, hi = 0x80, 0xBF
	switch c := b[0]; {
	case c >= 0xC2 && c <= 0xDF:
		need = 2
	case c == 0xE0:
		need, lo = 3, 0xA0
	case c == 0xED:
		need, hi = 3, 0x9F
	case c >= 0xE1 && c <= 0xEF:
		need = 3
	case c == 0xF0:
		need, lo = 4, 0x90
	case c == 0xF4:
		need, hi = 4, 0x8F
	case c >= 0xF1 && c <= 0xF3:
		need = 4
	default:
		return 1, 0, 0, 0
	}
	k = 1
	for k < need && k < len(b) {
		if b[k] < lo || b[k] > hi {
			return k, 0, 0, 0
		}
		lo, hi = 0x80, 0xBF
		k++
	}
	return k, need, lo, hi
}

// appendValidUTF8 appends src to dst with invalid UTF-8 replaced as the
// parser replaces it.
func appendValidUTF8(dst, src []byte) []byte {
	for len(src) > 0 {
		if n := utf8ValidPrefix(src); n > 0 {
			dst = append(dst, src[:n]...)
			src = src[n:]
			continue
		}
		k, _, _, _ := utf8InvalidPrefix(src)
		dst = append(dst, replacementChar...)
		src = src[k:]
	}
	return dst
}
