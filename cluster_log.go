package ssefanout

import (
	"encoding/binary"
	"errors"
	"net/http"
)

// The log's message format. A message is one batch from a holder: what the
// origin sent since the holder's previous message, in order. Its headers
// name the stream (its digest, which followers check), the log's epoch,
// and where the origin stands after it: the origin's last committed id
// (the Last-Event-ID a new holder resumes with) and, under assign_ids, the
// last proxy sequence. Its body is a list of records, each a kind byte and
// its fields: an entry (event, id-only block or retry line, with its
// wire bytes), an answer (the origin's answer to an attempt: live with
// the headers to pass on, retrying, or final with status, headers and
// body), or a take-over marker.

// Log message headers.
const (
	hdrDigest   = "Ssefanout-Digest"
	hdrEpoch    = "Ssefanout-Epoch"
	hdrOriginID = "Ssefanout-Origin-Id" // absent: the origin has committed no id
	hdrProxySeq = "Ssefanout-Proxy-Seq" // assign_ids: the last proxy sequence
	hdrNode     = "Ssefanout-Node"      // the holder that wrote it
	hdrTakeover = "Ssefanout-Takeover"  // "1" on a take-over marker
)

// maxLogOverhead is what a log message adds to one event: its headers and
// the record's own fields.
const maxLogOverhead = 1 << 10

// Record kinds.
const (
	recordEntry  = 'E'
	recordAnswer = 'A'
)

// logRecord is one record of a log message.
type logRecord struct {
	answer *answer // an answer, or
	entry  entry   // an entry
	// pos is where the origin stands after the record (the holder's side
	// only: it goes in the message's headers)
	pos logPosition
}

// appendRecord encodes r at the end of b.
func appendRecord(b []byte, r logRecord) []byte {
	if a := r.answer; a != nil {
		b = append(b, recordAnswer, byte(a.state))
		b = appendHeader(b, a.header)
		if a.final == nil {
			return append(b, 0)
		}
		b = append(b, 1)
		b = binary.AppendUvarint(b, uint64(a.final.status))
		b = appendHeader(b, a.final.header)
		b = appendBytes(b, a.final.body)
		return appendBytes(b, []byte(a.final.reason))
	}
	e := r.entry
	flags := byte(0)
	if e.setsID {
		flags |= 1
	}
	if e.hasID {
		flags |= 2
	}
	b = append(b, recordEntry, byte(e.kind), flags)
	b = binary.AppendUvarint(b, uint64(max(e.retry, 0)))
	b = appendBytes(b, []byte(e.id))
	return appendBytes(b, e.payload())
}

// recordLen is an upper bound of what appendRecord writes for an entry.
func recordLen(e *entry) int {
	return 3 + binary.MaxVarintLen64 + 2*binary.MaxVarintLen64 + len(e.id) + len(e.frame)
}

func appendBytes(b, v []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

func appendHeader(b []byte, h http.Header) []byte {
	b = binary.AppendUvarint(b, uint64(len(h)))
	for name, vals := range h {
		b = appendBytes(b, []byte(name))
		b = binary.AppendUvarint(b, uint64(len(vals)))
		for _, v := range vals {
			b = appendBytes(b, []byte(v))
		}
	}
	return b
}

var errBadRecord = errors.New("malformed log record")

// recordReader decodes a log message's body.
type recordReader struct {
	b   []byte
	err error
}

func (r *recordReader) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errBadRecord
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *recordReader) byte() byte {
	if r.err != nil || len(r.b) == 0 {
		r.err = errBadRecord
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

func (r *recordReader) bytes() []byte {
	n := r.uvarint()
	if r.err != nil || n > uint64(len(r.b)) {
		r.err = errBadRecord
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *recordReader) header() http.Header {
	n := r.uvarint()
	if n > uint64(len(r.b)) {
		r.err = errBadRecord
		return nil
	}
	h := make(http.Header, n)
	for range n {
		name := string(r.bytes())
		count := r.uvarint()
		if count > uint64(len(r.b)) {
			r.err = errBadRecord
			return nil
		}
		vals := make([]string, count)
		for i := range vals {
			vals[i] = string(r.bytes())
		}
		h[name] = vals
	}
	return h
}

// readRecords decodes a message body into its records; each entry gets a
// chunk frame of its own.
func readRecords(body []byte) ([]logRecord, error) {
	r := &recordReader{b: body}
	var out []logRecord
	for len(r.b) > 0 && r.err == nil {
		switch r.byte() {
		case recordAnswer:
			a := &answer{state: streamState(r.byte()), header: r.header()}
			if r.byte() == 1 {
				a.final = &finalAnswer{status: int(r.uvarint()), header: r.header()}
				a.final.body = r.bytes()
				a.final.reason = string(r.bytes())
			}
			out = append(out, logRecord{answer: a})
		case recordEntry:
			e := entry{kind: entryKind(r.byte())}
			flags := r.byte()
			e.setsID, e.hasID = flags&1 != 0, flags&2 != 0
			e.retry = int64(r.uvarint())
			e.id = string(r.bytes())
			payload := r.bytes()
			if r.err == nil {
				e.frame, e.hdr = frameOf(payload)
			}
			out = append(out, logRecord{entry: e})
		default:
			r.err = errBadRecord
		}
	}
	return out, r.err
}
