package ssefanout

import (
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// FuzzParser checks that the parser never panics, that chunking does not
// change what it finds, that it agrees with a literal reading of the spec,
// that its buffers stay within the bound, and that the encoders' output
// parses back to the same events, id blocks and retries.
func FuzzParser(f *testing.F) {
	for i, c := range append(slices.Clone(codecWPTCases), codecRuleCases...) {
		f.Add([]byte(strings.Join(c.resp, "")), uint64(i))
	}
	f.Fuzz(func(t *testing.T, in []byte, seed uint64) {
		bound := [...]int{4, 16, 64, 1 << 20}[seed%4]

		whole, wholeID := parseChunks(t, in, bound, [][]byte{in})
		chunked, chunkedID := parseChunks(t, in, bound, fuzzChunks(in, seed))
		if !slices.Equal(whole, chunked) || wholeID != chunkedID {
			t.Fatalf("chunking changed the result:\n whole   %v %q\nchunked %v %q", whole, wholeID, chunked, chunkedID)
		}

		if bound == 1<<20 && !slices.ContainsFunc(whole, func(r parsedRecord) bool { return r.kind == recSkipped }) {
			ref, refID := specParse(in)
			if !withinFieldBounds(ref, refID) {
				return // an id or type past maxFieldLen: the parser ignores or skips what the spec keeps
			}
			if !slices.Equal(whole, ref) || wholeID != refID {
				t.Fatalf("differs from the reference:\n got %v %q\nwant %v %q", whole, wholeID, ref, refID)
			}
		}

		checkCodecRoundTrip(t, in, bound)

		// A reset anywhere must leave the parser usable and bounded.
		p := newParser(bound)
		at := int(seed>>8) % (len(in) + 1)
		p.feed(in[:at], nil)
		p.reset()
		p.feed(in[at:], nil)
		if p.retained() > maxRetained(bound) {
			t.Fatalf("retained %d bytes, bound %d", p.retained(), maxRetained(bound))
		}
	})
}

// withinFieldBounds reports whether no id or type in recs is longer than
// maxFieldLen, where the parser departs from the letter of the spec.
func withinFieldBounds(recs []parsedRecord, lastID string) bool {
	if len(lastID) > maxFieldLen {
		return false
	}
	for _, r := range recs {
		if len(r.id) > maxFieldLen || len(r.typ) > maxFieldLen {
			return false
		}
	}
	return true
}

// parseChunks feeds chunks, checking the bound after each.
func parseChunks(t *testing.T, in []byte, bound int, chunks [][]byte) ([]parsedRecord, string) {
	t.Helper()
	p := newParser(bound)
	var got []parsedRecord
	emit := func(r *record) { got = append(got, toParsed(r)) }
	for _, c := range chunks {
		p.feed(c, emit)
		if p.retained() > maxRetained(bound) {
			t.Fatalf("retained %d bytes, bound %d", p.retained(), maxRetained(bound))
		}
	}
	p.reset()
	return got, p.lastEventID()
}

// fuzzChunks cuts in at places chosen by seed.
func fuzzChunks(in []byte, seed uint64) [][]byte {
	r := rand.New(rand.NewPCG(seed, seed>>32))
	var out [][]byte
	for len(in) > 0 {
		n := 1 + r.IntN(min(len(in), 1+r.IntN(16)))
		out = append(out, in[:n])
		in = in[n:]
	}
	return out
}

// checkCodecRoundTrip parses in, writes what it found with the encoders, and
// parses that again: the events, id blocks, retries and final id must match.
func checkCodecRoundTrip(t *testing.T, in []byte, bound int) {
	t.Helper()
	var first []parsedRecord
	var wire []byte
	p := newParser(bound)
	p.feed(in, func(r *record) {
		switch r.kind {
		case recEvent:
			n := len(wire)
			wire = appendEvent(wire, r)
			if got := len(wire) - n; got != encodedLen(r) {
				t.Fatalf("encodedLen %d, appendEvent wrote %d", encodedLen(r), got)
			}
		case recID:
			wire = appendIDBlock(wire, r.id)
		case recSkipped:
			if !r.setsID {
				return
			}
			wire = appendIDBlock(wire, r.id)
		case recRetry:
			wire = appendRetry(wire, r.retry)
		default:
			return
		}
		first = append(first, wireVisible(r))
	})
	p.reset()

	// The written block carries its id even when the original inherited
	// it, so it may need more room than the original.
	q := newParser(3*bound + 64)
	var second []parsedRecord
	q.feed(wire, func(r *record) {
		if r.kind != recComment {
			second = append(second, wireVisible(r))
		}
	})
	q.reset()
	if !slices.Equal(first, second) || p.lastEventID() != q.lastEventID() {
		t.Fatalf("round trip through %q:\n got %v %q\nwant %v %q", wire, second, q.lastEventID(), first, p.lastEventID())
	}
}

// wireVisible keeps what the wire format can carry: a skipped block that set
// an id travels as an id block, "message" is the default type, and whether
// a block set its id or inherited it is not visible.
func wireVisible(r *record) parsedRecord {
	out := toParsed(r)
	if out.kind == recSkipped {
		out = parsedRecord{kind: recID, id: r.id, hasID: r.hasID}
	}
	if out.typ == "message" {
		out.typ = ""
	}
	out.setsID = false
	return out
}

// specDecode is the Encoding Standard's UTF-8 decode, step by step, with one
// leading BOM removed.
func specDecode(in []byte) []rune {
	var out []rune
	var cp rune
	needed, seen := 0, 0
	lower, upper := byte(0x80), byte(0xBF)
	for i := 0; i < len(in); i++ {
		b := in[i]
		if needed == 0 {
			switch {
			case b <= 0x7F:
				out = append(out, rune(b))
			case b >= 0xC2 && b <= 0xDF:
				needed, cp = 1, rune(b&0x1F)
			case b >= 0xE0 && b <= 0xEF:
				if b == 0xE0 {
					lower = 0xA0
				}
				if b == 0xED {
					upper = 0x9F
				}
				needed, cp = 2, rune(b&0xF)
			case b >= 0xF0 && b <= 0xF4:
				if b == 0xF0 {
					lower = 0x90
				}
				if b == 0xF4 {
					upper = 0x8F
				}
				needed, cp = 3, rune(b&0x7)
			default:
				out = append(out, 0xFFFD)
			}
			continue
		}
		if b < lower || b > upper {
			cp, needed, seen = 0, 0, 0
			lower, upper = 0x80, 0xBF
			out = append(out, 0xFFFD)
			i-- // the byte is read again
			continue
		}
		lower, upper = 0x80, 0xBF
		cp = cp<<6 | rune(b&0x3F)
		seen++
		if seen == needed {
			out = append(out, cp)
			cp, needed, seen = 0, 0, 0
		}
	}
	if needed != 0 {
		out = append(out, 0xFFFD)
	}
	if len(out) > 0 && out[0] == 0xFEFF {
		out = out[1:]
	}
	return out
}

// specParse reads in as one whole response the way the spec's prose does,
// with buffers that keep whatever they are given.
func specParse(in []byte) ([]parsedRecord, string) {
	text := string(specDecode(in))
	var (
		out         []parsedRecord
		data, typ   strings.Builder
		idBuffer    string // persists, as the spec's last event ID buffer does
		lastID      string
		hasID       bool
		blockSetsID bool
	)
	for {
		i := strings.IndexAny(text, "\r\n")
		if i < 0 {
			return out, lastID // an unfinished block is discarded
		}
		line := text[:i]
		if text[i] == '\r' && i+1 < len(text) && text[i+1] == '\n' {
			i++
		}
		text = text[i+1:]
		switch {
		case line == "":
			lastID = idBuffer
			hasID = hasID || blockSetsID
			switch {
			case data.Len() > 0:
				d := strings.TrimSuffix(data.String(), "\n")
				out = append(out, parsedRecord{kind: recEvent, typ: typ.String(), data: d, id: lastID, hasID: hasID, setsID: blockSetsID})
			case blockSetsID:
				out = append(out, parsedRecord{kind: recID, id: lastID, hasID: true, setsID: true})
			}
			data.Reset()
			typ.Reset()
			blockSetsID = false
		case line[0] == ':':
			out = append(out, parsedRecord{kind: recComment})
		default:
			name, value, found := strings.Cut(line, ":")
			if found {
				value = strings.TrimPrefix(value, " ")
			}
			switch name {
			case "event":
				typ.Reset()
				typ.WriteString(value)
			case "data":
				data.WriteString(value)
				data.WriteByte('\n')
			case "id":
				if !strings.Contains(value, "\x00") {
					idBuffer = value
					blockSetsID = true
				}
			case "retry":
				if value != "" && strings.Trim(value, "0123456789") == "" {
					ms, err := strconv.ParseInt(value, 10, 64)
					if err != nil {
						ms = math.MaxInt64 // only a range error is possible
					}
					out = append(out, parsedRecord{kind: recRetry, retry: ms})
				}
			}
		}
	}
}
