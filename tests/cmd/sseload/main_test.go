package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestHistogramBuckets(t *testing.T) {
	prev := -1
	for _, us := range []uint64{0, 1, 127, 128, 129, 255, 256, 1000, 1 << 20, 1<<40 + 12345, 1<<63 + 5} {
		i := bucketOf(us)
		if i < prev || i >= histBuckets {
			t.Fatalf("bucketOf(%d) = %d, previous %d", us, i, prev)
		}
		prev = i
		ub := upperBound(i)
		if ub < us || (us >= histLinear && float64(ub-us) > float64(us)/64) {
			t.Errorf("value %d: bucket %d upper bound %d", us, i, ub)
		}
		if i > 0 && upperBound(i-1) >= us {
			t.Errorf("value %d: previous bucket's upper bound %d is not below it", us, upperBound(i-1))
		}
	}
}

func TestHistogramQuantile(t *testing.T) {
	var h histogram
	for i := 1; i <= 1000; i++ {
		h.record(time.Duration(i) * time.Millisecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Millisecond}, {0.99, 990 * time.Millisecond}, {1, time.Second}} {
		got := h.quantile(c.q)
		if got < c.want || float64(got-c.want) > float64(c.want)/64 {
			t.Errorf("quantile(%v) = %v, want about %v", c.q, got, c.want)
		}
	}
}

func testLoad(gapFrom string, expect uint64) *load {
	l := newLoad(&options{url: &url.URL{Scheme: "http", Host: "127.0.0.1:1", Path: "/"}, gapFrom: gapFrom, expectSeq: expect})
	l.measuring.Store(true)
	return l
}

// feedInPieces feeds stream to a new parser in pieces of the given size.
func feedInPieces(t *testing.T, l *load, stream string, piece int) *clientResult {
	t.Helper()
	res := &clientResult{}
	p := &eventParser{l: l, res: res}
	b := []byte(stream)
	for len(b) > 0 {
		k := min(piece, len(b))
		if err := p.feed(b[:k], time.Now()); err != nil {
			t.Fatalf("feed: %v", err)
		}
		b = b[k:]
	}
	return res
}

func TestParserWhateverTheReadSizes(t *testing.T) {
	ts := time.Now().Add(-5 * time.Millisecond).UnixNano()
	stream := ": hi\r\n" +
		"id: 1\ndata: {\"ts\":" + strconv.FormatInt(ts, 10) + "}\n\n" +
		"id: 2\ndata: a\ndata: b\n\n" +
		"id: 5\nretry: 10\ndata: x\n\n" + // gap of 2
		"id: 5\n\n" + // id-only block: no event
		"id: 4\ndata: y\r\n\r\n" + // repeat
		"data: " + strings.Repeat("z", 40000) + "\n\n" // no id: no sequence number
	for _, piece := range []int{1, 2, 3, 7, 64, 4096, len(stream)} {
		l := testLoad(gapFromID, 0)
		res := feedInPieces(t, l, stream, piece)
		if res.events != 5 || res.missing != 2 || res.repeats != 1 {
			t.Errorf("pieces of %d: got %+v", piece, res)
		}
		if l.lat.count() != 1 || l.lat.quantile(0.5) < 5*time.Millisecond {
			t.Errorf("pieces of %d: latency: %d samples, p50 %v", piece, l.lat.count(), l.lat.quantile(0.5))
		}
	}
}

func TestParserLineTooLong(t *testing.T) {
	for _, counting := range []bool{false, true} {
		p := &eventParser{l: testLoad(gapFromSeq, 0), res: &clientResult{}, counting: counting}
		if err := p.feed([]byte(sseEvents(1)), time.Now()); err != nil {
			t.Fatal(err)
		}
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		var err error
		for i := 0; i < 2*maxLineLen/len(chunk) && err == nil; i++ {
			err = p.feed(chunk, time.Now())
		}
		if err != errLineTooLong {
			t.Fatalf("counting %v: a line without end: %v, want %v", counting, err, errLineTooLong)
		}
	}
}

// sseEvents makes events whose data carries seq (and a ts), with ids that
// are not numbers, as nchan sends them.
func sseEvents(seqs ...int) string {
	var b strings.Builder
	for _, s := range seqs {
		fmt.Fprintf(&b, "id: 1700000000:%d\ndata: {\"ts\":%d,\"seq\":%d,\"pad\":\"xx\"}\n\n", s, time.Now().UnixNano(), s)
	}
	return b.String()
}

func TestSequenceFromData(t *testing.T) {
	stream := sseEvents(3, 4, 7, 7, 8)
	res := feedInPieces(t, testLoad(gapFromSeq, 0), stream, 5)
	if res.events != 5 || res.missing != 2 || res.repeats != 1 {
		t.Errorf("gap-from seq: got %+v", res)
	}
	if lost, got := res.lost(0); lost != res.missing || got != res.events {
		t.Errorf("lost(0) = %d, %d", lost, got)
	}
	res = feedInPieces(t, testLoad(gapFromID, 0), stream, 5)
	if res.missing != 0 || res.repeats != 0 || res.seqSeen {
		t.Errorf("gap-from id with non-numeric ids: got %+v", res)
	}
}

func TestExpectSeq(t *testing.T) {
	const expect = 6
	l := testLoad(gapFromSeq, expect)
	partial := feedInPieces(t, l, sseEvents(2, 3, 3, 5), 9)
	if lost, got := partial.lost(expect); lost != expect-3 || got != 3 || partial.complete {
		t.Errorf("partial: lost %d, got %d, %+v", lost, got, partial)
	}
	whole := feedInPieces(t, l, sseEvents(1, 2, 3, 4, 5, 6, 7), 9)
	if lost, got := whole.lost(expect); lost != 0 || got != expect || !whole.complete {
		t.Errorf("whole: lost %d, got %d, %+v", lost, got, whole)
	}
	if l.complete.Load() != 1 {
		t.Errorf("complete clients %d, want 1", l.complete.Load())
	}
}

// A counting client accounts for the same events, gaps and repeats as a
// parsed one, whatever the read sizes, and takes no latency.
func TestCountingMatchesParsing(t *testing.T) {
	stream := ": hi\r\n" + sseEvents(3, 4) + "id: 9\n\n" + // an id-only block is no event
		strings.ReplaceAll(sseEvents(7, 7, 8), "\n", "\r\n") + ":\n\n" + sseEvents(9) +
		"data: {\"seq\": 12, \"pad\":\"" + strings.Repeat("z", 9000) + "\"}\n\n" + // a space before the number
		"data: q\ndata: {\"q\":\"seq\",\"sequence\":99,\"seq\":13}\n\n" // a "q" elsewhere
	want := feedInPieces(t, testLoad(gapFromSeq, 0), stream, len(stream))
	if want.events != 8 || want.missing != 4 || want.repeats != 1 || want.lastSeq != 13 {
		t.Fatalf("parsed: %+v", want)
	}
	for _, piece := range []int{1, 2, 5, 6, 7, 64, 4096, len(stream)} {
		l := testLoad(gapFromSeq, 0)
		res := &clientResult{}
		p := &eventParser{l: l, res: res, counting: true}
		for b := []byte(stream); len(b) > 0; {
			k := min(piece, len(b))
			if err := p.feed(b[:k], time.Now()); err != nil {
				t.Fatalf("pieces of %d: %v", piece, err)
			}
			b = b[k:]
		}
		if *res != *want {
			t.Errorf("pieces of %d: counted %+v, parsed %+v", piece, *res, *want)
		}
		if l.total.Load() != want.events || l.window.Load() != want.events || l.lat.count() != 0 {
			t.Errorf("pieces of %d: total %d, window %d, latencies %d", piece, l.total.Load(), l.window.Load(), l.lat.count())
		}
	}
}

func TestCountingExpectSeq(t *testing.T) {
	const expect = 4
	l := testLoad(gapFromSeq, expect)
	res := &clientResult{}
	p := &eventParser{l: l, res: res, counting: true}
	if err := p.feed([]byte(sseEvents(1, 2, 4)), time.Now()); err != nil {
		t.Fatal(err)
	}
	if lost, got := res.lost(expect); lost != 1 || got != 3 || !res.complete || l.complete.Load() != 1 {
		t.Errorf("lost %d, got %d, %+v", lost, got, res)
	}
}

func TestLatencyEveryFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		ok   bool
	}{
		{[]string{"-latency-every", "10", "-gap-from", "seq"}, true},
		{[]string{"-latency-every", "1"}, true},
		{[]string{"-latency-every", "10"}, false}, // ids are not read when counting
		{[]string{"-latency-every", "0", "-gap-from", "seq"}, false},
		{[]string{"-latency-every", "-3", "-gap-from", "seq"}, false},
		{[]string{"-latency-every", "99999999999999999999", "-gap-from", "seq"}, false},
	} {
		_, err := parseFlags(append([]string{"-url", "http://127.0.0.1:1/"}, c.args...))
		if (err == nil) != c.ok {
			t.Errorf("%q: error %v", c.args, err)
		}
	}
}

func TestChunkDecoder(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	body := []byte(sseEvents(1, 2, 3, 4, 5, 6, 7, 8, 9, 10))
	var wire bytes.Buffer
	w := httputil.NewChunkedWriter(&wire)
	for rest := body; len(rest) > 0; {
		k := min(1+rng.IntN(100), len(rest))
		w.Write(rest[:k])
		rest = rest[k:]
	}
	w.Close()
	wire.WriteString("\r\n") // end of the (empty) trailer
	wire.WriteString("garbage after the end")
	for _, piece := range []int{1, 2, 5, 17, 512, wire.Len()} {
		var dec chunkDecoder
		var got []byte
		in := bytes.Clone(wire.Bytes())
		var err error
		for len(in) > 0 && err == nil {
			k := min(piece, len(in))
			var out []byte
			out, err = dec.decode(in[:k])
			got = append(got, out...)
			in = in[k:]
		}
		if err != io.EOF || !bytes.Equal(got, body) {
			t.Errorf("pieces of %d: err %v, body equal %v", piece, err, bytes.Equal(got, body))
		}
	}
	for _, bad := range []string{"zz\r\n", "\r\n", "3\r\nabcX", "1234567890abcdef0\r\n"} {
		var dec chunkDecoder
		if _, err := dec.decode([]byte(bad)); err != errBadChunk {
			t.Errorf("decode(%q) = %v, want %v", bad, err, errBadChunk)
		}
	}
}

// eventServer streams count events (seq 1..count), every interval, to
// each client, as the benchmark origin does.
func eventServer(count int, interval time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		rc.Flush()
		for i := 1; i <= count; i++ {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(interval):
			}
			fmt.Fprintf(w, "id: %d\ndata: {\"ts\":%d,\"seq\":%d}\n\n", i, time.Now().UnixNano(), i)
			rc.Flush()
		}
		<-r.Context().Done()
	})
}

func TestRunAgainstAServer(t *testing.T) {
	const clients, events = 20, 10
	plain := httptest.NewServer(eventServer(events, 20*time.Millisecond))
	defer plain.Close()
	secure := httptest.NewUnstartedServer(eventServer(events, 20*time.Millisecond))
	secure.EnableHTTP2 = true
	secure.StartTLS()
	defer secure.Close()
	for _, c := range []struct {
		name, url, reader string
		http2             bool
		latencyEvery      int
	}{
		{"h1 epoll", plain.URL, readerEpoll, false, 1},
		{"h1 epoll, latency from 1 in 3", plain.URL, readerEpoll, false, 3},
		{"h1 goroutine", plain.URL, readerGoroutine, false, 1},
		{"h1 tls", secure.URL, readerEpoll, false, 1},
		{"h2 tls", secure.URL, readerEpoll, true, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := []string{"-url", c.url + "/s", "-clients", strconv.Itoa(clients), "-duration", "20s",
				"-reader", c.reader, "-expect-seq", strconv.Itoa(events), "-sync", "-gap-from", "seq",
				"-latency-every", strconv.Itoa(c.latencyEvery)}
			if c.http2 {
				args = append(args, "-http2")
			}
			opts, err := parseFlags(args)
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			res, err := run(context.Background(), opts, &out, strings.NewReader("\n"))
			if err != nil {
				t.Fatal(err)
			}
			if res.Connected != clients || res.CompleteClients != clients || res.LostEvents != 0 || res.EventsTotal != clients*events {
				t.Errorf("got %+v", res)
			}
			if res.LatencySamples == 0 || res.LatencyP50ms <= 0 {
				t.Errorf("no latency measured: %+v", res)
			}
			// clients 0, N, 2N... are the sampled ones, each with every event in the window
			if sampled := int64((clients + c.latencyEvery - 1) / c.latencyEvery); res.LatencySamples > sampled*events {
				t.Errorf("%d latencies from %d sampled clients of %d events", res.LatencySamples, sampled, events)
			}
			var printed bytes.Buffer
			res.print(&printed)
			if said := strings.Contains(printed.String(), "from 1 client in 3"); said != (c.latencyEvery == 3) || (res.LatencyEvery > 1) != said {
				t.Errorf("latency_every %d, summary:\n%s", res.LatencyEvery, printed.String())
			}
			if out.String() != "sseload: window-start\nsseload: window-end\n" {
				t.Errorf("sync lines: %q", out.String())
			}
		})
	}
}

// burstStream is what a coalescing proxy writes a client in a burst: many
// origin events of 200 bytes back to back.
func burstStream(events int) []byte {
	var b []byte
	pad := strings.Repeat("x", 140)
	for i := 1; i <= events; i++ {
		b = fmt.Appendf(b, "id: %d\ndata: {\"ts\":%d,\"seq\":%d,\"pad\":\"%s\"}\n\n", i, time.Now().UnixNano(), i, pad)
	}
	return b
}

func benchmarkFeed(b *testing.B, counting bool) {
	stream := burstStream(1000)
	now := time.Now()
	b.SetBytes(int64(len(stream)))
	b.ReportAllocs()
	for b.Loop() {
		p := &eventParser{l: testLoad(gapFromSeq, 0), res: &clientResult{}, counting: counting}
		for s := stream; len(s) > 0; {
			k := min(len(s), 16<<10) // reads of 16 KiB
			if err := p.feed(s[:k], now); err != nil {
				b.Fatal(err)
			}
			s = s[k:]
		}
	}
}

// The parser's cost per event against the counting one's: what bounds the
// load tool's core in bursts.
func BenchmarkParse(b *testing.B) { benchmarkFeed(b, false) }
func BenchmarkCount(b *testing.B) { benchmarkFeed(b, true) }
