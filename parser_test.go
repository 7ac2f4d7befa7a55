package ssefanout

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// parsedRecord is a comparable copy of a record, for tests.
type parsedRecord struct {
	kind   recordKind
	typ    string
	data   string
	id     string
	hasID  bool
	setsID bool
	retry  int64
	size   int64
}

func (r parsedRecord) String() string {
	switch r.kind {
	case recEvent:
		return fmt.Sprintf("event{typ:%q data:%q id:%q hasID:%v setsID:%v}", r.typ, r.data, r.id, r.hasID, r.setsID)
	case recID:
		return fmt.Sprintf("idblock{id:%q hasID:%v}", r.id, r.hasID)
	case recRetry:
		return fmt.Sprintf("retry{%d}", r.retry)
	case recComment:
		return "comment"
	case recSkipped:
		return fmt.Sprintf("skipped{id:%q hasID:%v setsID:%v size:%d}", r.id, r.hasID, r.setsID, r.size)
	}
	return fmt.Sprintf("kind(%d)", r.kind)
}

// toParsed copies the fields that mean something for the record's kind.
func toParsed(r *record) parsedRecord {
	out := parsedRecord{kind: r.kind}
	switch r.kind {
	case recEvent:
		out.typ, out.data = string(r.typ), string(r.data)
		out.id, out.hasID, out.setsID = r.id, r.hasID, r.setsID
	case recID:
		out.id, out.hasID, out.setsID = r.id, r.hasID, r.setsID
	case recSkipped:
		out.id, out.hasID, out.setsID, out.size = r.id, r.hasID, r.setsID, r.size
	case recRetry:
		out.retry = r.retry
	}
	return out
}

// Builders for expected records.
func wantEv(data string) parsedRecord { return parsedRecord{kind: recEvent, data: data} }
func wantIDBlock(id string) parsedRecord {
	return parsedRecord{kind: recID, id: id, hasID: true, setsID: true}
}
func wantRetry(ms int64) parsedRecord            { return parsedRecord{kind: recRetry, retry: ms} }
func wantComment() parsedRecord                  { return parsedRecord{kind: recComment} }
func wantSkip(size int64) parsedRecord           { return parsedRecord{kind: recSkipped, size: size} }
func (r parsedRecord) t(typ string) parsedRecord { r.typ = typ; return r }

// i sets the committed id the record carries and whether its block set it.
func (r parsedRecord) i(id string, sets bool) parsedRecord {
	r.id, r.hasID, r.setsID = id, true, sets
	return r
}

// codecCase is one conformance vector: responses parsed one after another
// with reset between them, and the records and final id they must yield.
type codecCase struct {
	name   string
	max    int // 0 means the default bound
	initID string
	resp   []string
	want   []parsedRecord
	lastID string
}

func oneChunk(s string) [][]byte { return [][]byte{[]byte(s)} }

func byteChunks(s string) [][]byte {
	out := make([][]byte, len(s))
	for i := 0; i < len(s); i++ {
		out[i] = []byte{s[i]}
	}
	return out
}

// randomCuts cuts s at random places, with many short chunks.
func randomCuts(r *rand.Rand, s string) [][]byte {
	var out [][]byte
	for len(s) > 0 {
		n := 1 + r.IntN(min(len(s), 1+r.IntN(8)))
		if r.IntN(4) == 0 {
			n = 1 + r.IntN(len(s))
		}
		out = append(out, []byte(s[:n]))
		s = s[n:]
	}
	return out
}

// run parses the case's responses, cutting each with cut.
func (c *codecCase) run(t *testing.T, cut func(string) [][]byte) ([]parsedRecord, string) {
	t.Helper()
	p := newParser(c.max)
	p.setLastEventID(c.initID)
	var got []parsedRecord
	emit := func(r *record) { got = append(got, toParsed(r)) }
	for _, resp := range c.resp {
		for _, chunk := range cut(resp) {
			p.feed(chunk, emit)
			if c.max > 0 && p.retained() > maxRetained(c.max) {
				t.Fatalf("retained %d bytes, bound %d", p.retained(), maxRetained(c.max))
			}
		}
		p.reset()
	}
	return got, p.lastEventID()
}

// check runs the case whole, byte by byte, cut in two at every place and cut
// at random places.
func (c *codecCase) check(t *testing.T) {
	t.Helper()
	verify := func(how string, cut func(string) [][]byte) {
		t.Helper()
		got, last := c.run(t, cut)
		if !slices.Equal(got, c.want) {
			t.Fatalf("%s:\n got %v\nwant %v", how, got, c.want)
		}
		if last != c.lastID {
			t.Fatalf("%s: lastEventID %q, want %q", how, last, c.lastID)
		}
	}
	verify("whole", oneChunk)
	verify("byte by byte", byteChunks)
	longest := 0
	for _, r := range c.resp {
		longest = max(longest, len(r))
	}
	for at := 1; at < longest; at++ {
		verify(fmt.Sprintf("split at %d", at), func(s string) [][]byte {
			if at >= len(s) {
				return oneChunk(s)
			}
			return [][]byte{[]byte(s[:at]), []byte(s[at:])}
		})
	}
	for seed := range uint64(20) {
		r := rand.New(rand.NewPCG(seed, 7))
		verify(fmt.Sprintf("random seed %d", seed), func(s string) [][]byte { return randomCuts(r, s) })
	}
}

var longRun = strings.Repeat("x", 2049)

// codecWPTCases are the web-platform-tests eventsource format-* and event-data
// vectors, with results worked out from the spec.
var codecWPTCases = []codecCase{
	{
		name: "format-bom",
		resp: []string{"\xEF\xBB\xBFdata:1\n\n\xEF\xBB\xBFdata:2\n\ndata:3\n\n"},
		want: []parsedRecord{wantEv("1"), wantEv("3")},
	},
	{
		name: "format-bom-2",
		resp: []string{"\xEF\xBB\xBF\xEF\xBB\xBFdata:1\n\ndata:2\n\ndata:3\n\n"},
		want: []parsedRecord{wantEv("2"), wantEv("3")},
	},
	{
		name: "format-comments",
		resp: []string{"data:1\r:\x00\n:\r\ndata:2\n:" + longRun + "\rdata:3\n:data:fail\r:" + longRun + "\ndata:4\n\n"},
		want: []parsedRecord{wantComment(), wantComment(), wantComment(), wantComment(), wantComment(), wantEv("1\n2\n3\n4")},
	},
	{
		name: "format-data-before-final-empty-line",
		resp: []string{
			"retry:1000\ndata:test1\n\nid:test\ndata:test2\n",
			"retry:1000\ndata:test1\n\nid:test\ndata:test2\n",
		},
		want: []parsedRecord{wantRetry(1000), wantEv("test1"), wantRetry(1000), wantEv("test1")},
	},
	{
		name: "format-field-data",
		resp: []string{"data:\n\ndata\ndata\n\ndata:test\n\n"},
		want: []parsedRecord{wantEv(""), wantEv("\n"), wantEv("test")},
	},
	{
		name: "format-field-event",
		resp: []string{"event:test\ndata:x\n\ndata:x\n\n"},
		want: []parsedRecord{wantEv("x").t("test"), wantEv("x")},
	},
	{
		name: "format-field-event-empty",
		resp: []string{"event: \ndata:data\n\n"},
		want: []parsedRecord{wantEv("data")},
	},
	{
		name:   "format-field-id",
		resp:   []string{"id: …\nretry: 200\ndata: hello\n\n", "data: …\n\n"},
		want:   []parsedRecord{wantRetry(200), wantEv("hello").i("…", true), wantEv("…").i("…", false)},
		lastID: "…",
	},
	{
		name:   "format-field-id-2",
		resp:   []string{"id: …\nretry: 200\ndata: hello\n\n", "data: …\n\n", "data: …\n\n"},
		want:   []parsedRecord{wantRetry(200), wantEv("hello").i("…", true), wantEv("…").i("…", false), wantEv("…").i("…", false)},
		lastID: "…",
	},
	{
		name: "format-field-id-3 persists",
		resp: []string{"id: 1\ndata: 1\n\ndata: 2\n\nid: 2\ndata:3\n\ndata:4\n\n"},
		want: []parsedRecord{
			wantEv("1").i("1", true), wantEv("2").i("1", false),
			wantEv("3").i("2", true), wantEv("4").i("2", false),
		},
		lastID: "2",
	},
	{
		name: "format-field-id-3 empty resets",
		resp: []string{"id: 1\ndata: 1\n\nid:\ndata:2\n\ndata:3\n\n"},
		want: []parsedRecord{wantEv("1").i("1", true), wantEv("2").i("", true), wantEv("3").i("", false)},
	},
	{
		name: "format-field-id-3 bare resets",
		resp: []string{"id: 1\ndata: 1\n\nid\ndata:2\n\ndata:3\n\n"},
		want: []parsedRecord{wantEv("1").i("1", true), wantEv("2").i("", true), wantEv("3").i("", false)},
	},
	{
		name: "format-field-id-null",
		resp: []string{"id: \x00\x00\nretry: 1000\ndata: hello\n\n"},
		want: []parsedRecord{wantRetry(1000), wantEv("hello")},
	},
	{
		name: "format-field-parsing",
		resp: []string{"data:\x00\ndata:  2\rData:1\ndata\x00:2\ndata:1\r\x00data:4\nda-ta:3\rdata_5\ndata:3\rdata:\r\n data:32\ndata:4\n\n"},
		want: []parsedRecord{wantEv("\x00\n 2\n1\n3\n\n4")},
	},
	{
		name: "format-field-retry",
		resp: []string{"retry:03000\ndata:x\n\n"},
		want: []parsedRecord{wantRetry(3000), wantEv("x")},
	},
	{
		name: "format-field-retry-bogus",
		resp: []string{"retry:2000\nretry:1000x\ndata:x\n\n"},
		want: []parsedRecord{wantRetry(2000), wantEv("x")},
	},
	{
		name: "format-field-retry-empty",
		resp: []string{"retry\ndata:test\n\n"},
		want: []parsedRecord{wantEv("test")},
	},
	{
		name: "format-field-unknown",
		resp: []string{"data:test\n data\ndata\nfoobar:xxx\njustsometext\n:thisisacommentyay\ndata:test\n\n"},
		want: []parsedRecord{wantComment(), wantEv("test\n\ntest")},
	},
	{
		name: "format-leading-space",
		resp: []string{"data:\ttest\rdata: \ndata:test\n\n"},
		want: []parsedRecord{wantEv("\ttest\n\ntest")},
	},
	{
		name: "format-newlines",
		resp: []string{"data:test\r\ndata\ndata:test\r\n\r"},
		want: []parsedRecord{wantEv("test\n\ntest")},
	},
	{
		name: "format-null-character",
		resp: []string{"data:\x00\n\n"},
		want: []parsedRecord{wantEv("\x00")},
	},
	{
		name: "format-utf-8",
		resp: []string{"data:ok\xE2\x80\xA6\n\n"},
		want: []parsedRecord{wantEv("ok…")},
	},
	{
		name: "event-data",
		resp: []string{"data:msg\ndata:msg\n\n:\nfalsefield:msg\n\nfalsefield:msg\nData:data\n\ndata\n\ndata:end\n\n"},
		want: []parsedRecord{wantEv("msg\nmsg"), wantComment(), wantEv(""), wantEv("end")},
	},
}

// codecRuleCases pin the rules the WPT vectors leave open.
var codecRuleCases = []codecCase{
	// Line ends.
	{name: "CRLF, CR and LF mixed", resp: []string{"data:a\r\ndata:b\rdata:c\n\r\n"}, want: []parsedRecord{wantEv("a\nb\nc")}},
	{name: "CR then LF is one line end", resp: []string{"data:a\r\ndata:b\r\n\r\n"}, want: []parsedRecord{wantEv("a\nb")}},
	{name: "LF CR is two", resp: []string{"data:a\n\rdata:b\n\n"}, want: []parsedRecord{wantEv("a"), wantEv("b")}},

	// UTF-8 decoding.
	{name: "two invalid bytes", resp: []string{"data:\xFF\xFF\n\n"}, want: []parsedRecord{wantEv("\uFFFD\uFFFD")}},
	{name: "cut sequence then ASCII", resp: []string{"data:\xE2\x80A\n\n"}, want: []parsedRecord{wantEv("\uFFFDA")}},
	{name: "surrogate", resp: []string{"data:\xED\xA0\x80\n\n"}, want: []parsedRecord{wantEv("\uFFFD\uFFFD\uFFFD")}},
	{name: "overlong two bytes", resp: []string{"data:\xC0\x80\n\n"}, want: []parsedRecord{wantEv("\uFFFD\uFFFD")}},
	{name: "overlong three bytes", resp: []string{"data:\xE0\x80\x80\n\n"}, want: []parsedRecord{wantEv("\uFFFD\uFFFD\uFFFD")}},
	{name: "above U+10FFFF", resp: []string{"data:\xF4\x90\x80\x80\n\n"}, want: []parsedRecord{wantEv("\uFFFD\uFFFD\uFFFD\uFFFD")}},
	{name: "lone continuation and F5", resp: []string{"data:a\x80b\xF5c\n\n"}, want: []parsedRecord{wantEv("a\uFFFDb\uFFFDc")}},
	{name: "cut sequence then valid one", resp: []string{"data:\xE1\x80\xE1\x80\x80\n\n"}, want: []parsedRecord{wantEv("\uFFFD\u1000")}},
	{name: "sequence cut by LF", resp: []string{"data:\xF0\x9F\x98\ndata:x\n\n"}, want: []parsedRecord{wantEv("\uFFFD\nx")}},
	{name: "sequence cut by CR", resp: []string{"data:\xE2\x82\rdata:x\n\n"}, want: []parsedRecord{wantEv("\uFFFD\nx")}},
	{name: "sequence cut by colon", resp: []string{"data:\xE2:\x80\n\n"}, want: []parsedRecord{wantEv("\uFFFD:\uFFFD")}},
	{name: "four-byte character", resp: []string{"data:\xF0\x9F\x98\x80 \xE2\x82\xAC\n\n"}, want: []parsedRecord{wantEv("😀 €")}},
	{name: "U+FFFD sent as such", resp: []string{"data:\xEF\xBF\xBD\n\n"}, want: []parsedRecord{wantEv("\uFFFD")}},
	{
		name:   "invalid bytes in type and id",
		resp:   []string{"event:\xFF\nid:a\xC0\ndata:x\n\n"},
		want:   []parsedRecord{wantEv("x").t("\uFFFD").i("a\uFFFD", true)},
		lastID: "a\uFFFD",
	},
	{name: "invalid bytes in a name", resp: []string{"\xFFdata:x\n\ndata:y\n\n"}, want: []parsedRecord{wantEv("y")}},
	{name: "unfinished sequence at reset", resp: []string{"data:x\n\ndata:\xE2\x82", "\xACdata:y\n\n"}, want: []parsedRecord{wantEv("x")}},

	// BOM.
	{name: "BOM after reset", resp: []string{"\xEF\xBB\xBFdata:1\n\n", "\xEF\xBB\xBFdata:2\n\n"}, want: []parsedRecord{wantEv("1"), wantEv("2")}},
	{name: "response of only a BOM", resp: []string{"\xEF\xBB\xBF", "\xEF\xBB\xBFdata:x\n\n"}, want: []parsedRecord{wantEv("x")}},
	{
		name: "partial BOM is input",
		resp: []string{"\xEF\xBB:c\n", "\xEF\xBB\xBF:c\n", "\xEF:c\n", "\xEF\xBB\xBF\xEF\xBB\xBF:c\n"},
		want: []parsedRecord{wantComment()},
	},
	{name: "BOM cut by reset", resp: []string{"\xEF\xBB", "\xBF:c\n"}, want: nil},
	{name: "BOM not at start", resp: []string{":a\n\xEF\xBB\xBF:b\n"}, want: []parsedRecord{wantComment()}},

	// Fields.
	{name: "only the first colon splits", resp: []string{"data:a:b: c\n\n"}, want: []parsedRecord{wantEv("a:b: c")}},
	{name: "only one space is stripped", resp: []string{"data:   x\nevent:  t\n\n"}, want: []parsedRecord{wantEv("  x").t(" t")}},
	{name: "field names are case-sensitive", resp: []string{"DATA:x\nEvent:t\nID:1\nRetry:1\ndata:y\n\n"}, want: []parsedRecord{wantEv("y")}},
	{name: "long field name", resp: []string{"dataaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa:x\nevent2:y\ndata:z\n\n"}, want: []parsedRecord{wantEv("z")}},
	{name: "type does not carry over", resp: []string{"event:a\n\ndata:x\n\nevent:b\nevent:c\ndata:y\n\n"}, want: []parsedRecord{wantEv("x"), wantEv("y").t("c")}},
	{name: "type message as sent", resp: []string{"event:message\ndata:x\n\n"}, want: []parsedRecord{wantEv("x").t("message")}},

	// ids.
	{name: "id-only block", resp: []string{"id: 7\n\n"}, want: []parsedRecord{wantIDBlock("7")}, lastID: "7"},
	{name: "id and type without data", resp: []string{"id: 7\nevent: x\n:hi\n\n"}, want: []parsedRecord{wantComment(), wantIDBlock("7")}, lastID: "7"},
	{name: "bare id block", resp: []string{"id: 7\n\nid\n\n"}, want: []parsedRecord{wantIDBlock("7"), wantIDBlock("")}},
	{name: "type-only block", resp: []string{"event: x\n\n\n\n"}, want: nil},
	{
		name:   "id with NUL keeps the committed id",
		resp:   []string{"id: 1\ndata:a\n\nid: 2\x00\ndata:b\n\n"},
		want:   []parsedRecord{wantEv("a").i("1", true), wantEv("b").i("1", false)},
		lastID: "1",
	},
	{
		name:   "id with NUL keeps the block's id",
		resp:   []string{"id: 1\nid: a\x00b\ndata:x\n\n"},
		want:   []parsedRecord{wantEv("x").i("1", true)},
		lastID: "1",
	},
	{name: "id with NUL only", resp: []string{"id:\x00\n\n"}, want: nil},
	{name: "last id field wins", resp: []string{"id: 1\nid: 22\ndata:x\n\n"}, want: []parsedRecord{wantEv("x").i("22", true)}, lastID: "22"},
	{name: "same id again", resp: []string{"id: 5\ndata:a\n\nid: 5\ndata:b\n\n"}, want: []parsedRecord{wantEv("a").i("5", true), wantEv("b").i("5", true)}, lastID: "5"},
	{name: "initial id", initID: "42", resp: []string{"data:x\n\n"}, want: []parsedRecord{wantEv("x").i("42", false)}, lastID: "42"},
	{name: "initial id replaced", initID: "42", resp: []string{"id\ndata:x\n\n"}, want: []parsedRecord{wantEv("x").i("", true)}},
	{name: "initial id with LF ignored", initID: "4\n2", resp: []string{"data:x\n\n"}, want: []parsedRecord{wantEv("x")}},
	{name: "initial id with invalid UTF-8", initID: "4\xFF", resp: []string{"data:x\n\n"}, want: []parsedRecord{wantEv("x").i("4\uFFFD", false)}, lastID: "4\uFFFD"},

	// retry.
	{name: "retry with space", resp: []string{"retry: 1500\n"}, want: []parsedRecord{wantRetry(1500)}},
	{name: "retry zero and CR", resp: []string{"retry:0\rretry:00000000000000000000000000001\r\n"}, want: []parsedRecord{wantRetry(0), wantRetry(1)}},
	{
		name: "retry bogus",
		resp: []string{"retry:  1500\nretry:-1\nretry:+1\nretry:1.5\nretry:\nretry: \nretry:1 \nretry:1\x00\nRetry:1\nretry\nretry:١\n"},
		want: nil,
	},
	{
		name: "retry saturates",
		resp: []string{"retry:9223372036854775807\nretry:9223372036854775808\nretry:99999999999999999999999\nretry:9223372036854775806\n"},
		want: []parsedRecord{wantRetry(math.MaxInt64), wantRetry(math.MaxInt64), wantRetry(math.MaxInt64), wantRetry(math.MaxInt64 - 1)},
	},
	{name: "retry inside a block", resp: []string{"data:a\nretry:5\ndata:b\n\n"}, want: []parsedRecord{wantRetry(5), wantEv("a\nb")}},

	// End of a response.
	{name: "unfinished block", resp: []string{"id: 5\ndata: x\n"}, want: nil},
	{
		name:   "unfinished block keeps the committed id",
		resp:   []string{"id: 1\ndata:a\n\nid: 2\ndata:b", "data:c\n\n"},
		want:   []parsedRecord{wantEv("a").i("1", true), wantEv("c").i("1", false)},
		lastID: "1",
	},
	{name: "unfinished line", resp: []string{"data:x\n\ndata:partial", "\n\n"}, want: []parsedRecord{wantEv("x")}},
	{name: "id line without its blank line", resp: []string{"id: 9\n", "\n"}, want: nil},
	{name: "CR state restarts", resp: []string{"data:a\r", "\ndata:b\n\n"}, want: []parsedRecord{wantEv("b")}},

	// The bound.
	{
		name:   "oversized block skipped, id kept",
		max:    16,
		resp:   []string{"data: 0123456789abcdefg\nid: 9\n\ndata: ok\n\n"},
		want:   []parsedRecord{wantSkip(18).i("9", true), wantEv("ok").i("9", false)},
		lastID: "9",
	},
	{
		name:   "id before the oversized data",
		max:    16,
		resp:   []string{"id: 9\ndata: 0123456789\ndata: 0123456789\n\ndata: ok\n\n"},
		want:   []parsedRecord{wantSkip(22).i("9", true), wantEv("ok").i("9", false)},
		lastID: "9",
	},
	// max_event_size bounds the data as dispatched: exactly max passes
	{name: "exact fit", max: 6, resp: []string{"data:abcdef\n\n"}, want: []parsedRecord{wantEv("abcdef")}},
	{name: "exact fit over lines", max: 6, resp: []string{"data:ab\ndata:cde\n\n"}, want: []parsedRecord{wantEv("ab\ncde")}},
	{name: "one byte over", max: 6, resp: []string{"data:abcdefg\n\ndata:ok\n\n"}, want: []parsedRecord{wantSkip(8), wantEv("ok")}},
	{name: "one line end over", max: 6, resp: []string{"data:abc\ndata:def\n\ndata:ok\n\n"}, want: []parsedRecord{wantSkip(8), wantEv("ok")}},
	{name: "type has its own bound", max: 6, resp: []string{"event:abcdefgh\ndata:abcdef\n\n"}, want: []parsedRecord{wantEv("abcdef").t("abcdefgh")}},
	{name: "id has its own bound", max: 6, resp: []string{"id:12345678\ndata:abcdef\n\n"}, want: []parsedRecord{wantEv("abcdef").i("12345678", true)}, lastID: "12345678"},
	{name: "id longer than its bound skips its block", max: 4, resp: []string{"id:1\n\nid:" + strings.Repeat("9", maxFieldLen+1) + "\ndata:x\n\nid:2\nid:" + strings.Repeat("9", maxFieldLen+1) + "\n\n"}, want: []parsedRecord{wantIDBlock("1"), wantSkip(2).i("1", false), wantSkip(0).i("1", false)}, lastID: "1"},
	{name: "id of exactly its bound is kept", max: 4, resp: []string{"id:" + strings.Repeat("9", maxFieldLen) + "\n\n"}, want: []parsedRecord{wantIDBlock(strings.Repeat("9", maxFieldLen))}, lastID: strings.Repeat("9", maxFieldLen)},
	{name: "id with NUL is ignored whatever its length", max: 4, resp: []string{"id:000000\x00\ndata:\n\nid:00\x00000000\ndata:x\n\n"}, want: []parsedRecord{wantEv(""), wantEv("x")}},
	{name: "type longer than its bound skips its event", max: 4, resp: []string{"event: " + strings.Repeat("t", maxFieldLen+1) + "\ndata:x\n\nevent: " + strings.Repeat("t", maxFieldLen+1) + "\nid: 1\n\n"}, want: []parsedRecord{wantSkip(maxFieldLen + 3), wantIDBlock("1")}, lastID: "1"},
	{name: "replacement characters count", max: 6, resp: []string{"data:\xFF\xFF\n\ndata:\xFF\xFF\xFF\n\n"}, want: []parsedRecord{wantEv("\uFFFD\uFFFD"), wantSkip(4)}},
	{
		name: "comments and unknown fields are not buffered",
		max:  8,
		resp: []string{":" + longRun + "\nfoo:" + longRun + "\n" + longRun + "\ndata:ok\n\n"},
		want: []parsedRecord{wantComment(), wantEv("ok")},
	},
	{
		name: "retry in a skipped block",
		max:  4,
		resp: []string{"data:123456\nretry:7\n\n"},
		want: []parsedRecord{wantRetry(7), wantSkip(7)},
	},
}

func TestParserWPT(t *testing.T) {
	for _, c := range codecWPTCases {
		t.Run(c.name, func(t *testing.T) { c.check(t) })
	}
}

func TestParserRules(t *testing.T) {
	for _, c := range codecRuleCases {
		t.Run(c.name, func(t *testing.T) { c.check(t) })
	}
}

// TestParserChunkBoundaries feeds chunks cut at the places that matter.
func TestParserChunkBoundaries(t *testing.T) {
	tests := []struct {
		name   string
		chunks []string
		want   []parsedRecord
	}{
		{"CR LF across chunks", []string{"data:a\r", "\ndata:b\r", "\n\r", "\n"}, []parsedRecord{wantEv("a\nb")}},
		{"CR ends chunk, CR starts next", []string{"data:a\r", "\rdata:b\n\n"}, []parsedRecord{wantEv("a"), wantEv("b")}},
		{"two-byte character", []string{"data:\xC3", "\xA9\n\n"}, []parsedRecord{wantEv("é")}},
		{"three-byte character", []string{"data:\xE2\x82", "\xAC\n\n"}, []parsedRecord{wantEv("€")}},
		{"four-byte character in four chunks", []string{"data:\xF0", "\x9F", "\x98", "\x80\n\n"}, []parsedRecord{wantEv("😀")}},
		{"cut sequence broken in next chunk", []string{"data:\xE2\x82", "A\n\n"}, []parsedRecord{wantEv("\uFFFDA")}},
		{"cut sequence ended by line end", []string{"data:\xE2", "\n\n"}, []parsedRecord{wantEv("\uFFFD")}},
		{"BOM in three chunks", []string{"\xEF", "\xBB", "\xBF", "data:1\n\n"}, []parsedRecord{wantEv("1")}},
		{"partial BOM then colon", []string{"\xEF", "\xBB", ":c\n"}, nil},
		{"space after colon in next chunk", []string{"data:", " x\n\n"}, []parsedRecord{wantEv("x")}},
		{"name cut", []string{"da", "ta", ":x\n\n"}, []parsedRecord{wantEv("x")}},
		{"NUL in id in second chunk", []string{"id: 1\nid: 2", "\x00\ndata:x\n\n"}, []parsedRecord{wantEv("x").i("1", true)}},
		{"empty chunks", []string{"", "data:x", "", "\n", "", "\n"}, []parsedRecord{wantEv("x")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newParser(0)
			var got []parsedRecord
			for _, c := range tt.chunks {
				p.feed([]byte(c), func(r *record) { got = append(got, toParsed(r)) })
			}
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}
}

// TestParserRecordSlices checks that record slices are the parser's own
// buffers, reused between events, so callers must copy them.
func TestParserRecordSlices(t *testing.T) {
	p := newParser(0)
	var datas [][]byte
	p.feed([]byte("data:one\n\ndata:two\n\n"), func(r *record) { datas = append(datas, r.data) })
	if len(datas) != 2 || string(datas[1]) != "two" {
		t.Fatalf("got %q", datas)
	}
	if &datas[0][0] != &datas[1][0] {
		t.Fatal("data buffer not reused")
	}
}

// TestParserHugeLine feeds a 200 MiB line that never ends in the bound's
// buffers, then normal events.
func TestParserHugeLine(t *testing.T) {
	const (
		bound = 1 << 20
		total = 200 << 20
		chunk = 32 << 10
	)
	for _, prefix := range []string{"data: ", "event: ", "id: ", ":", "foo: ", "xxxxxxxx"} {
		t.Run(prefix, func(t *testing.T) {
			size := int64(total)
			if prefix != "data: " && testing.Short() {
				size = 8 << 20
			}
			p := newParser(bound)
			var got []parsedRecord
			emit := func(r *record) { got = append(got, toParsed(r)) }
			buf := bytes.Repeat([]byte("x"), chunk)

			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			p.feed([]byte("id: 1\n"+prefix), emit)
			for n := int64(0); n < size; n += chunk {
				p.feed(buf, emit)
				if p.retained() > maxRetained(bound) {
					t.Fatalf("retained %d bytes after %d", p.retained(), n)
				}
			}
			p.feed([]byte("\ndata:y\n\ndata: after\n\n"), emit)
			runtime.ReadMemStats(&after)
			// Allocated in total: the buffers' doublings up to the bound,
			// nothing per chunk.
			if d := after.TotalAlloc - before.TotalAlloc; d > 3*bound {
				t.Fatalf("allocated %d bytes while parsing", d)
			}
			runtime.GC()
			runtime.ReadMemStats(&after)
			if d := int64(after.HeapAlloc) - int64(before.HeapAlloc); d > 2*bound {
				t.Fatalf("heap grew by %d bytes", d)
			}

			var want []parsedRecord
			switch prefix {
			case "data: ":
				want = []parsedRecord{wantSkip(size+1+2).i("1", true), wantEv("after").i("1", false)}
			case "event: ":
				want = []parsedRecord{wantSkip(size+2).i("1", true), wantEv("after").i("1", false)}
			case "id: ":
				// The id is too long to keep: its block is skipped and
				// commits none of its ids
				want = []parsedRecord{wantSkip(2), wantEv("after")}
			case ":":
				want = []parsedRecord{wantComment(), wantEv("y").i("1", true), wantEv("after").i("1", false)}
			default:
				want = []parsedRecord{wantEv("y").i("1", true), wantEv("after").i("1", false)}
			}
			if !slices.Equal(got, want) {
				t.Fatalf("got %v, want %v", got, want)
			}
			runtime.KeepAlive(p)
		})
	}
}

// TestParserRetainedAfterBigEvents checks that buffers grown by a big type,
// id or data do not add up past the bound in later blocks.
func TestParserRetainedAfterBigEvents(t *testing.T) {
	const bound = 4096
	big := strings.Repeat("y", bound-10)
	p := newParser(bound)
	n := 0
	emit := func(r *record) { n++ }
	for _, s := range []string{
		"event: " + big + "\ndata:x\n\n",
		"id: " + big + "\ndata:x\n\n",
		"data: " + big + "\n\n",
		"event: " + big + "\ndata:x\n\n",
		"event: a\nevent: " + big + "\nevent: b\nid: c\ndata:" + big[:100] + "\n\n",
	} {
		p.feed([]byte(s), emit)
		if p.retained() > maxRetained(bound) {
			t.Fatalf("retained %d bytes after %.20q", p.retained(), s)
		}
	}
	if n != 5 {
		t.Fatalf("got %d records, want 5", n)
	}
}

func TestParserAllocs(t *testing.T) {
	const events = 128
	inputs := make([][]byte, events)
	for i := range inputs {
		inputs[i] = smallJSONEvent(i)
	}
	if len(inputs[0]) < 200 {
		t.Fatalf("small event is %d bytes", len(inputs[0]))
	}
	p := newParser(0)
	var got int
	emit := func(r *record) { got++ }
	i := 0
	allocs := testing.AllocsPerRun(100, func() {
		p.feed(inputs[i%events], emit)
		i++
	})
	if allocs > 1 {
		t.Fatalf("parsing a small event with a new id: %v allocations, want at most 1", allocs)
	}
	allocs = testing.AllocsPerRun(100, func() { p.feed(inputs[0], emit) })
	if allocs != 0 {
		t.Fatalf("parsing a small event with the same id: %v allocations, want 0", allocs)
	}
	if got == 0 {
		t.Fatal("no events")
	}
}

// smallJSONEvent is a 200-odd-byte JSON event with an id, as a typical upstream
// sends.
func smallJSONEvent(i int) []byte {
	return fmt.Appendf(nil, "id: %08d\nevent: update\ndata: {\"id\":%d,\"type\":\"order.updated\",\"status\":\"shipped\","+
		"\"customer\":\"c-1234567\",\"items\":[{\"sku\":\"A-100\",\"qty\":2},{\"sku\":\"B-200\",\"qty\":1}],"+
		"\"total\":\"159.90\",\"currency\":\"EUR\"}\n\n", i, i)
}
