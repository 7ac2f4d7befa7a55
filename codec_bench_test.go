package ssefanout

import (
	"bytes"
	"testing"
)

// BenchmarkParseSmall parses typical small JSON events, each with a new id.
func BenchmarkParseSmall(b *testing.B) {
	const events = 1024
	inputs := make([][]byte, events)
	for i := range inputs {
		inputs[i] = smallJSONEvent(i)
	}
	p := newParser(0)
	emit := func(*record) {}
	b.SetBytes(int64(len(inputs[0])))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		p.feed(inputs[i%events], emit)
		i++
	}
}

// BenchmarkParse64K parses one event with 64 KiB of data.
func BenchmarkParse64K(b *testing.B) {
	in := bigJSONEvent()
	p := newParser(0)
	emit := func(*record) {}
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	for b.Loop() {
		p.feed(in, emit)
	}
}

// BenchmarkEncodeSmall writes a typical small JSON event with its id.
func BenchmarkEncodeSmall(b *testing.B) {
	benchmarkEncode(b, smallJSONEvent(12345678))
}

// BenchmarkEncode64K writes one event with 64 KiB of data.
func BenchmarkEncode64K(b *testing.B) {
	benchmarkEncode(b, bigJSONEvent())
}

// benchmarkEncode parses in once and then measures writing its event.
func benchmarkEncode(b *testing.B, in []byte) {
	var r record
	p := newParser(0)
	p.feed(in, func(rc *record) {
		r = *rc
		r.typ = bytes.Clone(rc.typ)
		r.data = bytes.Clone(rc.data)
	})
	if r.kind != recEvent {
		b.Fatal("no event")
	}
	dst := make([]byte, 0, encodedLen(&r))
	b.SetBytes(int64(encodedLen(&r)))
	b.ReportAllocs()
	for b.Loop() {
		dst = appendEvent(dst[:0], &r)
	}
}

// bigJSONEvent is an event with an id and 64 KiB of JSON-like data, in lines of
// about 1 KiB, as a large upstream event might be sent.
func bigJSONEvent() []byte {
	in := []byte("id: 1\nevent: snapshot\n")
	line := append([]byte("data: "), bytes.Repeat([]byte(`{"k":"v","n":12345},`), 51)...)
	for len(in) < 64<<10 {
		in = append(in, line...)
		in = append(in, '\n')
	}
	return append(in, '\n')
}
