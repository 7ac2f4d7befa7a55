package ssefanout

import (
	"bytes"
	"strconv"
)

// The encoders: events back to wire bytes, once per event. Every field is
// written as "name: value" with one space after the colon (so a value that
// starts with a space keeps it), and no value can carry a line end.

// encodedLen returns the exact number of bytes appendEvent adds for r, so
// that callers can allocate once.
func encodedLen(r *record) int {
	n := 1 // the blank line
	if r.hasID {
		n += encodedFieldLen("id", len(r.id))
	}
	if writesEventType(r.typ) {
		n += encodedFieldLen("event", len(r.typ))
	}
	data := r.data
	crs := bytes.IndexByte(data, '\r') >= 0
	for {
		line, rest, more := cutDataLine(data, crs)
		n += encodedFieldLen("data", len(line))
		if !more {
			return n
		}
		data = rest
	}
}

// appendEvent appends r as an event: its id when the stream has one, its type
// unless it is the default, one data line per line of data, and a blank line.
func appendEvent(dst []byte, r *record) []byte {
	if r.hasID {
		dst = appendFieldLine(dst, "id", r.id)
	}
	if writesEventType(r.typ) {
		dst = appendFieldLine(dst, "event", r.typ)
	}
	data := r.data
	crs := bytes.IndexByte(data, '\r') >= 0
	for {
		line, rest, more := cutDataLine(data, crs)
		dst = appendDataLine(dst, line)
		if !more {
			return append(dst, '\n')
		}
		data = rest
	}
}

// appendIDBlock appends a block that only sets the last-event ID, so that
// clients resume after a block that carried no event.
func appendIDBlock(dst []byte, id string) []byte {
	return append(appendFieldLine(dst, "id", id), '\n')
}

// appendRetry appends a retry field. No blank line follows: the field
// applies at once, and a lone blank line would dispatch a block that, for a
// client going by the letter of the spec, could commit an empty id.
func appendRetry(dst []byte, ms int64) []byte {
	dst = append(dst, "retry: "...)
	dst = strconv.AppendInt(dst, max(ms, 0), 10)
	return append(dst, '\n')
}

// appendComment appends a comment line. CR and LF in text become spaces so
// that the comment cannot end early and inject fields.
func appendComment(dst []byte, text string) []byte {
	if text == "" {
		return append(dst, ":\n"...)
	}
	dst = append(dst, ": "...)
	return append(appendNoEOL(dst, text), '\n')
}

// writesEventType says whether an event type must be written: the empty
// type and "message" both read back as "message".
func writesEventType(typ []byte) bool {
	return len(typ) > 0 && string(typ) != "message"
}

// encodedFieldLen is the length of a field line appendFieldLine writes.
func encodedFieldLen(name string, valueLen int) int {
	if valueLen == 0 {
		return len(name) + 2
	}
	return len(name) + 3 + valueLen
}

// appendFieldLine writes `name: value` with exactly one space, so that a
// value starting with a space keeps it, or `name:` when the value is empty.
// CR and LF in the value become spaces; parsed values never contain them.
func appendFieldLine[T string | []byte](dst []byte, name string, value T) []byte {
	dst = append(dst, name...)
	if len(value) == 0 {
		return append(dst, ":\n"...)
	}
	dst = append(dst, ": "...)
	return append(appendNoEOL(dst, value), '\n')
}

// appendDataLine writes a data field for one line, which cutDataLine has
// freed of CR and LF.
func appendDataLine(dst, line []byte) []byte {
	if len(line) == 0 {
		return append(dst, "data:\n"...)
	}
	dst = append(dst, "data: "...)
	dst = append(dst, line...)
	return append(dst, '\n')
}

// appendNoEOL appends s with CR and LF replaced by spaces.
func appendNoEOL[T string | []byte](dst []byte, s T) []byte {
	if !hasEOL(s) {
		return append(dst, s...)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '\r' || c == '\n' {
			c = ' '
		}
		dst = append(dst, c)
	}
	return dst
}

// hasEOL says whether s contains CR or LF. The values it checks (ids,
// types, comments) are short, so a plain loop does.
func hasEOL[T string | []byte](s T) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '\r' || s[i] == '\n' {
			return true
		}
	}
	return false
}

// cutDataLine splits off the first line of data at LF, or, when crs says data
// has CR (it never does when it comes from the parser), at CR or CRLF too,
// so that no line can end early on the wire. more reports that a line end
// was found, so rest is another line, possibly empty.
func cutDataLine(data []byte, crs bool) (line, rest []byte, more bool) {
	var i int
	if crs {
		i = bytes.IndexAny(data, "\r\n")
	} else {
		i = bytes.IndexByte(data, '\n')
	}
	if i < 0 {
		return data, nil, false
	}
	j := i + 1
	if data[i] == '\r' && j < len(data) && data[j] == '\n' {
		j++
	}
	return data[:i], data[j:], true
}

// maxEncodedEvent is the most bytes an event with maxEventSize bytes of
// data takes in the history: data made only of line ends is written as one
// "data:" line per line (6 bytes for each byte of data, and one more
// line), plus an id and a type at their bounds, the blank line and the
// chunk framing.
func maxEncodedEvent(maxEventSize int64) int64 {
	const idLine = len("id: \n") + maxFieldLen
	const typeLine = len("event: \n") + maxFieldLen
	const framing = 16 + 4 // hex size and two CRLFs
	return 6*(maxEventSize+1) + int64(idLine+typeLine+1+framing)
}

// The HTTP/1.1 chunk framing of history entries: each entry is framed once
// as the chunk that clients whose sockets are written directly get, in its
// own buffer (see entry).

// chunkHeaderLen is the length of the chunk header for n payload bytes:
// the size in hex and CRLF.
func chunkHeaderLen(n int) int {
	digits := 1
	for v := n >> 4; v > 0; v >>= 4 {
		digits++
	}
	return digits + 2
}

// newFrame allocates a chunk for n payload bytes and writes its header;
// the caller appends exactly n bytes, then closeFrame.
func newFrame(n int) []byte {
	hdr := chunkHeaderLen(n)
	b := make([]byte, 0, hdr+n+2)
	b = strconv.AppendInt(b, int64(n), 16)
	return append(b, '\r', '\n')
}

// closeFrame ends a chunk.
func closeFrame(b []byte) []byte { return append(b, '\r', '\n') }

// frameOf copies payload into a chunk of its own.
func frameOf(payload []byte) (frame []byte, hdr uint8) {
	frame = newFrame(len(payload))
	hdr = uint8(len(frame))
	return closeFrame(append(frame, payload...)), hdr
}

// lastChunk ends a chunked body: a client sees a clean end of stream.
var lastChunk = []byte("0\r\n\r\n")
