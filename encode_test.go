package ssefanout

import (
	"math"
	"testing"
)

// Tests of the encoders: events back to wire bytes.

func TestEncodeAllocs(t *testing.T) {
	r := &record{kind: recEvent, typ: []byte("update"), data: []byte("a\nb\n\nc"), id: "42", hasID: true}
	dst := make([]byte, 0, 1024)
	allocs := testing.AllocsPerRun(100, func() {
		dst = appendEvent(dst[:0], r)
		dst = appendIDBlock(dst, "42")
		dst = appendRetry(dst, 3000)
		dst = appendComment(dst, "keep-alive")
	})
	if allocs != 0 {
		t.Fatalf("encoding into a big enough buffer: %v allocations, want 0", allocs)
	}
}

func TestAppendEvent(t *testing.T) {
	tests := []struct {
		name string
		r    record
		want string
	}{
		{"data only", record{data: []byte("hello")}, "data: hello\n\n"},
		{"empty data", record{data: []byte("")}, "data:\n\n"},
		{"one empty line", record{data: []byte("\n")}, "data:\ndata:\n\n"},
		{"empty lines around", record{data: []byte("\nx\n")}, "data:\ndata: x\ndata:\n\n"},
		{"lines", record{data: []byte("a\nb")}, "data: a\ndata: b\n\n"},
		{"leading space kept", record{data: []byte(" lead\n  two")}, "data:  lead\ndata:   two\n\n"},
		{"type message omitted", record{typ: []byte("message"), data: []byte("x")}, "data: x\n\n"},
		{"type", record{typ: []byte("update"), data: []byte("x")}, "event: update\ndata: x\n\n"},
		{"type with space", record{typ: []byte(" t"), data: []byte("x")}, "event:  t\ndata: x\n\n"},
		{"id", record{id: "7", hasID: true, data: []byte("x")}, "id: 7\ndata: x\n\n"},
		{"empty id", record{id: "", hasID: true, data: []byte("x")}, "id:\ndata: x\n\n"},
		{"id with space", record{id: " 7", hasID: true, data: []byte("x")}, "id:  7\ndata: x\n\n"},
		{"no id yet", record{id: "ignored", data: []byte("x")}, "data: x\n\n"},
		{"all", record{id: "9", hasID: true, typ: []byte("t"), data: []byte("a\n\nb")}, "id: 9\nevent: t\ndata: a\ndata:\ndata: b\n\n"},
		{"CR in data", record{data: []byte("a\rb\r\nc\r")}, "data: a\ndata: b\ndata: c\ndata:\n\n"},
		{"CR LF in type and id", record{id: "1\r\n2", hasID: true, typ: []byte("a\nb"), data: []byte("x")}, "id: 1  2\nevent: a b\ndata: x\n\n"},
		{"UTF-8", record{data: []byte("€\n\uFFFD")}, "data: €\ndata: \uFFFD\n\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.r.kind = recEvent
			got := appendEvent([]byte("prefix"), &tt.r)
			if string(got) != "prefix"+tt.want {
				t.Fatalf("got %q, want %q", got, "prefix"+tt.want)
			}
			if n := encodedLen(&tt.r); n != len(tt.want) {
				t.Fatalf("encodedLen %d, appendEvent wrote %d", n, len(tt.want))
			}
		})
	}
}

func TestAppendOthers(t *testing.T) {
	tests := []struct {
		got, want string
	}{
		{string(appendIDBlock(nil, "7")), "id: 7\n\n"},
		{string(appendIDBlock(nil, "")), "id:\n\n"},
		{string(appendIDBlock(nil, " 7")), "id:  7\n\n"},
		{string(appendIDBlock([]byte("x"), "a\nb")), "xid: a b\n\n"},
		{string(appendRetry(nil, 3000)), "retry: 3000\n"},
		{string(appendRetry(nil, 0)), "retry: 0\n"},
		{string(appendRetry(nil, math.MaxInt64)), "retry: 9223372036854775807\n"},
		{string(appendRetry(nil, -5)), "retry: 0\n"},
		{string(appendComment(nil, "")), ":\n"},
		{string(appendComment(nil, "hi")), ": hi\n"},
		{string(appendComment(nil, " hi")), ":  hi\n"},
		{string(appendComment([]byte("x"), "a\r\nb\rc\n")), "x: a  b c \n"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}

// TestRoundTrip checks that what the encoders write parses back to what they
// were given.
func TestRoundTrip(t *testing.T) {
	var wire []byte
	wire = appendRetry(wire, 1500)
	wire = appendEvent(wire, &record{data: []byte(" a\n\n b ")})
	wire = appendEvent(wire, &record{typ: []byte(" t"), data: []byte("")})
	wire = appendIDBlock(wire, " 5")
	wire = appendComment(wire, "ping")
	wire = appendEvent(wire, &record{id: " 5", hasID: true, data: []byte("\n")})
	wire = appendIDBlock(wire, "")
	wire = appendEvent(wire, &record{id: "", hasID: true, typ: []byte("message"), data: []byte("x")})

	c := codecCase{
		resp: []string{string(wire)},
		want: []parsedRecord{
			wantRetry(1500), wantEv(" a\n\n b "), wantEv("").t(" t"), wantIDBlock(" 5"), wantComment(),
			wantEv("\n").i(" 5", true), wantIDBlock(""), wantEv("x").i("", true),
		},
	}
	c.check(t)
}
