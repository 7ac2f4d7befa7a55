package ssefanout

import (
	"fmt"
	"net/url"
	"strings"
	"testing"
)

// Unit tests of a stream's history, without network or upstream.

func testStream(history int, historyBytes int64) *stream {
	h := newHub(&upstreamTemplate{scheme: "http", host: "x"}, nil, nil, &hubConfig{settings: hubSettings{history: history, historyBytes: historyBytes}})
	return newStream(h, "k", &url.URL{Path: "/"}, nil, "", hubSettings{history: history, historyBytes: historyBytes})
}

// collectAt collects for a client at cursor, as the client loop does.
func collectAt(s *stream, cursor uint64, buf **[]byte, skipRetry bool) ([]byte, bool, uint64, <-chan struct{}, lag) {
	c := &client{s: s, cursor: cursor}
	b, wake, behind := c.collect(buf, skipRetry)
	return b.out, b.coalesced, b.next, wake, behind
}

func pub(s *stream, id string, setsID bool, data string) {
	s.append(framedEntry(entryEvent, []byte(data), entry{id: id, setsID: setsID, hasID: true}))
}

func TestCollectCoalescesPendingEntries(t *testing.T) {
	s := testStream(8, 1<<20)
	for i := range 5 {
		pub(s, fmt.Sprint(i), true, fmt.Sprintf("<%d>", i))
	}
	out, coalesced, next, _, behind := collectAt(s, 1, new(*[]byte), false)
	if string(out) != "<1><2><3><4>" || !coalesced || next != 5 || behind != lagNone {
		t.Fatalf("collect from 1: %q coalesced=%v next=%d behind=%v", out, coalesced, next, behind)
	}
	out, coalesced, next, _, _ = collectAt(s, 4, new(*[]byte), false)
	if string(out) != "<4>" || coalesced || next != 5 {
		t.Fatalf("a single pending entry should be returned as is: %q %v %d", out, coalesced, next)
	}
	if out, _, next, _, _ := collectAt(s, 5, new(*[]byte), false); out != nil || next != 5 {
		t.Fatalf("nothing pending: %q %d", out, next)
	}
	// retry entries are skipped for clients whose handler overrides retry
	s.append(framedEntry(entryRetry, []byte("<r>"), entry{}))
	pub(s, "5", true, "<5>")
	if out, _, _, _, _ := collectAt(s, 4, new(*[]byte), true); string(out) != "<4><5>" {
		t.Fatalf("skipRetry: %q", out)
	}
	if out, _, _, _, _ := collectAt(s, 4, new(*[]byte), false); string(out) != "<4><r><5>" {
		t.Fatalf("with retry: %q", out)
	}
}

func TestCollectDropsLaggingClients(t *testing.T) {
	s := testStream(8, 1<<20)
	for i := range 20 {
		pub(s, fmt.Sprint(i), true, "e")
	}
	// ring holds 12..19; 3/4 of 8 is 6 entries behind at most
	if _, _, _, _, behind := collectAt(s, 11, new(*[]byte), false); behind != lagEvicted {
		t.Fatal("a cursor before the oldest entry must be lagging")
	}
	if _, _, _, _, behind := collectAt(s, 13, new(*[]byte), false); behind != lagFar {
		t.Fatal("7 entries behind in a ring of 8 must be lagging")
	}
	if _, _, _, _, behind := collectAt(s, 14, new(*[]byte), false); behind != lagNone {
		t.Fatal("6 entries behind in a ring of 8 is within 3/4")
	}
	// by bytes: 3/4 of 150 bytes (entries of 10 bytes framed in 15)
	b := testStream(100, 150)
	for range 10 {
		pub(b, "", false, strings.Repeat("x", 10))
	}
	if _, _, _, _, behind := collectAt(b, 2, new(*[]byte), false); behind != lagFar {
		t.Fatal("120 bytes behind of 150 must be lagging")
	}
	if _, _, _, _, behind := collectAt(b, 3, new(*[]byte), false); behind != lagNone {
		t.Fatal("105 bytes behind of 150 is within 3/4")
	}
}

func TestHistoryBounds(t *testing.T) {
	s := testStream(4, 35)
	for i := range 6 {
		pub(s, fmt.Sprint(i), true, "0123456789")
	}
	// 35 bytes hold two 10-byte entries, each framed in 15 bytes
	if s.hist.count != 2 || s.hist.bytes != 30 || s.hist.head != 6 {
		t.Fatalf("count=%d bytes=%d head=%d", s.hist.count, s.hist.bytes, s.hist.head)
	}
	s.resize(hubSettings{history: 1, historyBytes: 1000})
	if s.hist.count != 1 || len(s.hist.ring) != 1 {
		t.Fatalf("resize to 1: count=%d len=%d", s.hist.count, len(s.hist.ring))
	}
	if out, _, _, _, _ := collectAt(s, 5, new(*[]byte), false); string(out) != "0123456789" {
		t.Fatalf("newest entry lost in resize: %q", out)
	}
	s.resize(hubSettings{history: 10, historyBytes: 1000})
	for i := 6; i < 9; i++ {
		pub(s, fmt.Sprint(i), true, "ab")
	}
	if s.hist.count != 4 || s.hist.head != 9 {
		t.Fatalf("after growing: count=%d head=%d", s.hist.count, s.hist.head)
	}
}

func TestFindResumesAfterMostRecentEntrySettingTheID(t *testing.T) {
	s := testStream(10, 1<<20)
	pub(s, "a", true, "1")
	pub(s, "a", false, "2") // inherits a, did not set it
	pub(s, "b", true, "3")
	pub(s, "a", true, "4") // a again: resume after this one
	pub(s, "a", false, "5")
	if seq, ok := s.find("a"); !ok || seq != 4 {
		t.Fatalf("find(a) = %d %v, want 4", seq, ok)
	}
	if seq, ok := s.find("b"); !ok || seq != 3 {
		t.Fatalf("find(b) = %d %v, want 3", seq, ok)
	}
	if _, ok := s.find("zzz"); ok {
		t.Fatal("unknown id found")
	}
	// a stream resumed upstream from a client's id knows that id too
	c := newStream(s.hub, "k2", &url.URL{Path: "/"}, nil, "42", hubSettings{history: 10, historyBytes: 1 << 20})
	pub(c, "43", true, "x")
	if seq, ok := c.find("42"); !ok || seq != 0 {
		t.Fatalf("find(initial id) = %d %v, want 0", seq, ok)
	}
	if got := c.hist.replayStart(5); got != 0 {
		t.Fatalf("replayStart(5) = %d", got)
	}
}

// TestResizeSameSettingsKeepsHistory: every config that starts applies its
// settings to the surviving streams; the same settings must keep every
// entry of a full ring.
func TestResizeSameSettingsKeepsHistory(t *testing.T) {
	s := testStream(4, 1<<20)
	for i := range 4 {
		pub(s, fmt.Sprint(i), true, "e")
	}
	s.resize(hubSettings{history: 4, historyBytes: 1 << 20})
	if s.hist.count != 4 {
		t.Fatalf("resize with the same settings dropped entries: %d left", s.hist.count)
	}
	s.resize(hubSettings{history: 4, historyBytes: 12})
	if s.hist.count != 2 {
		t.Fatalf("a lower history_bytes should keep 2 one-byte entries (6 bytes framed), kept %d", s.hist.count)
	}
}

func TestOneEntryBehindIsNeverLagging(t *testing.T) {
	s := testStream(1, 100)
	pub(s, "1", true, strings.Repeat("x", 90))
	if _, _, _, _, behind := collectAt(s, 0, new(*[]byte), false); behind != lagNone {
		t.Fatal("with history 1, a client one event behind was dropped")
	}
	pub(s, "2", true, "y")
	if _, _, _, _, behind := collectAt(s, 0, new(*[]byte), false); behind != lagEvicted {
		t.Fatal("a client whose entry was evicted must be lagging")
	}
}

// framedEntry is e with payload framed as its chunk, as the upstream
// frames what it publishes.
func framedEntry(kind entryKind, payload []byte, e entry) entry {
	e.kind = kind
	e.frame, e.hdr = frameOf(payload)
	return e
}
