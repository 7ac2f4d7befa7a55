package main

import (
	"bytes"
	"errors"
	"io"
	"time"
)

var errLineTooLong = errors.New("line too long")

// eventParser splits one client's event stream into events, fed in pieces
// as they are read, and accounts for each event. It reads only what the
// benchmark needs: the "ts" and "seq" numbers of the data's JSON and a
// numeric id. Lines end in LF or CRLF (a lone CR is not a line end here).
// A counting parser only counts the events by their "seq" fields.
type eventParser struct {
	l     *load
	res   *clientResult
	carry []byte // the start of a line split across reads
	// counting: the stream's events are only counted by their data's
	// "seq" fields (see countSeqs); no latency is taken
	counting bool

	hasData bool
	ts      int64 // 0: no "ts" in the data
	seq     uint64
	seqOK   bool
	id      uint64
	idOK    bool
}

// feed parses b, read at now.
func (p *eventParser) feed(b []byte, now time.Time) error {
	if p.counting {
		return p.countSeqs(b)
	}
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return p.keep(b)
		}
		line := b[:i]
		b = b[i+1:]
		if len(p.carry) > 0 {
			p.carry = append(p.carry, line...)
			line = p.carry
		}
		p.line(line, now)
		p.carry = p.carry[:0]
	}
	return nil
}

// keep holds b, more of a line that has not ended, for the next read.
func (p *eventParser) keep(b []byte) error {
	if len(p.carry)+len(b) > maxLineLen {
		return errLineTooLong
	}
	p.carry = append(p.carry, b...)
	return nil
}

var (
	tsField  = []byte(`"ts":`)
	seqField = []byte(`"seq":`)
)

// countSeqs accounts for the events in b by their data's "seq" fields
// alone: one search per event over whole lines, without splitting them or
// reading times, a fraction of the parser's work (for the clients whose
// latency is not sampled, so that one core reads a burst as fast as a
// proxy writes it). Each "seq" field is one event, and its number goes
// through the same sequence accounting as the parser's; an event is
// counted once its data line is whole.
func (p *eventParser) countSeqs(b []byte) error {
	end := bytes.LastIndexByte(b, '\n')
	if end < 0 {
		return p.keep(b)
	}
	lines := b[:end+1]
	var n int64
	if len(p.carry) > 0 { // the line split across reads ends here
		first := bytes.IndexByte(lines, '\n')
		p.carry = append(p.carry, lines[:first+1]...)
		n += p.seqs(p.carry)
		lines = lines[first+1:]
	}
	n += p.seqs(lines)
	p.carry = append(p.carry[:0], b[end+1:]...)
	p.l.counted(p.res, n)
	return nil
}

// seqs accounts for the "seq" fields in whole lines and says how many
// there were. It looks for the field's "q", which is rarer in an event
// stream than its quote: a search for the quote stops at every JSON key.
func (p *eventParser) seqs(lines []byte) (n int64) {
	const before = len(`"se`)
	for {
		i := bytes.IndexByte(lines, 'q')
		if i < 0 {
			return n
		}
		start := i - before
		if start < 0 || !bytes.HasPrefix(lines[start:], seqField) {
			lines = lines[i+1:]
			continue
		}
		lines = lines[start+len(seqField):]
		if v, k := parseUint(bytes.TrimLeft(lines, " ")); k > 0 {
			p.l.sequence(p.res, v)
		}
		n++
	}
}

// line handles one line without its LF.
func (p *eventParser) line(line []byte, now time.Time) {
	line = bytes.TrimSuffix(line, []byte{'\r'})
	if len(line) == 0 {
		p.dispatch(now)
		return
	}
	if line[0] == ':' {
		return
	}
	name, value, _ := bytes.Cut(line, []byte{':'})
	value = bytes.TrimPrefix(value, []byte{' '})
	switch string(name) {
	case "data":
		p.hasData = true
		if v, ok := jsonUint(value, tsField); ok {
			p.ts = int64(v)
		}
		if v, ok := jsonUint(value, seqField); ok {
			p.seq, p.seqOK = v, true
		}
	case "id":
		v, n := parseUint(value)
		p.id, p.idOK = v, n > 0 && n == len(value)
	}
}

// dispatch ends the event being read, if it has data.
func (p *eventParser) dispatch(now time.Time) {
	if p.hasData {
		seq, ok := p.id, p.idOK
		if p.l.opts.gapFrom == gapFromSeq {
			seq, ok = p.seq, p.seqOK
		}
		p.l.event(p.res, now, p.ts, seq, ok)
	}
	p.hasData, p.ts, p.seqOK, p.idOK = false, 0, false, false
}

// jsonUint finds field (`"name":`) in a JSON text and reads the unsigned
// integer after it.
func jsonUint(data, field []byte) (uint64, bool) {
	i := bytes.Index(data, field)
	if i < 0 {
		return 0, false
	}
	v, n := parseUint(bytes.TrimLeft(data[i+len(field):], " "))
	return v, n > 0
}

// parseUint reads the decimal digits (at most 19) at the start of b,
// without allocating, and says how many it read.
func parseUint(b []byte) (v uint64, n int) {
	for ; n < len(b) && n < 19 && b[n] >= '0' && b[n] <= '9'; n++ {
		v = v*10 + uint64(b[n]-'0')
	}
	return v, n
}

// chunkDecoder removes HTTP/1.1 chunked framing from a body read in pieces.
// Chunk extensions and trailers are skipped.
type chunkDecoder struct {
	state  chunkState
	size   int64 // of the chunk whose size line is being read
	digits int
	remain int64 // data bytes of the current chunk still to come
}

type chunkState uint8

const (
	chunkSize   chunkState = iota // reading the hex size
	chunkSizeLF                   // skipping an extension or CR up to the LF
	chunkData
	chunkDataCR // the CRLF after a chunk's data
	chunkDataLF
	chunkDone // the last chunk was read
)

var errBadChunk = errors.New("malformed chunked encoding")

// decode strips the framing from p in place and returns the data it
// carried, a prefix of p. After the last chunk it returns io.EOF.
func (c *chunkDecoder) decode(p []byte) ([]byte, error) {
	n := 0
	for i := 0; i < len(p); {
		switch c.state {
		case chunkSize:
			if err := c.sizeByte(p[i]); err != nil {
				return p[:n], err
			}
			i++
		case chunkSizeLF:
			if p[i] == '\n' {
				c.startData()
			}
			i++
		case chunkData:
			k := int(min(c.remain, int64(len(p)-i)))
			n += copy(p[n:], p[i:i+k])
			i += k
			c.remain -= int64(k)
			if c.remain == 0 {
				c.state = chunkDataCR
			}
		case chunkDataCR:
			if p[i] != '\r' {
				return p[:n], errBadChunk
			}
			c.state = chunkDataLF
			i++
		case chunkDataLF:
			if p[i] != '\n' {
				return p[:n], errBadChunk
			}
			c.state, c.size, c.digits = chunkSize, 0, 0
			i++
		case chunkDone:
			return p[:n], io.EOF
		}
	}
	if c.state == chunkDone {
		return p[:n], io.EOF
	}
	return p[:n], nil
}

func (c *chunkDecoder) sizeByte(b byte) error {
	var v byte
	switch {
	case b >= '0' && b <= '9':
		v = b - '0'
	case b >= 'a' && b <= 'f':
		v = b - 'a' + 10
	case b >= 'A' && b <= 'F':
		v = b - 'A' + 10
	case c.digits > 0 && (b == '\r' || b == ';' || b == ' ' || b == '\t'):
		c.state = chunkSizeLF
		return nil
	case c.digits > 0 && b == '\n':
		c.startData()
		return nil
	default:
		return errBadChunk
	}
	if c.digits == 15 {
		return errBadChunk
	}
	c.size = c.size<<4 | int64(v)
	c.digits++
	return nil
}

func (c *chunkDecoder) startData() {
	if c.size == 0 {
		c.state = chunkDone
		return
	}
	c.remain, c.state = c.size, chunkData
}
