package ssefanout

import (
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Log records decode to what was encoded: entries with their bytes, ids
// and flags (each framed again as its chunk), and answers with their
// headers and final bodies.
func TestLogRecordsRoundTrip(t *testing.T) {
	ev := framedEntry(entryEvent, []byte("id: 7\ndata: x\n\n"), entry{id: "7", setsID: true, hasID: true})
	retry := framedEntry(entryRetry, []byte("retry: 500\n"), entry{retry: 500})
	idOnly := framedEntry(entryID, []byte("id:\n\n"), entry{id: "", setsID: true, hasID: true})
	live := answer{state: stateLive, header: http.Header{"X-Origin": {"a", "b"}}}
	final := answer{state: stateFinal, final: &finalAnswer{status: 404, header: http.Header{"Content-Type": {"text/plain"}}, body: []byte("gone\n"), reason: ""}}
	var body []byte
	for _, r := range []logRecord{{answer: &live}, {entry: ev}, {entry: retry}, {entry: idOnly}, {answer: &final}} {
		body = appendRecord(body, r)
	}
	got, err := readRecords(body)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 5 {
		t.Fatalf("%d records, want 5", len(got))
	}
	if !reflect.DeepEqual(*got[0].answer, live) {
		t.Errorf("live answer: %+v", *got[0].answer)
	}
	for i, want := range []entry{ev, retry, idOnly} {
		e := got[i+1].entry
		if string(e.frame) != string(want.frame) || e.hdr != want.hdr || e.id != want.id || e.setsID != want.setsID || e.hasID != want.hasID || e.kind != want.kind || e.retry != want.retry {
			t.Errorf("entry %d: %+v, want %+v", i, e, want)
		}
	}
	f := got[4].answer.final
	if f == nil || f.status != 404 || string(f.body) != "gone\n" || f.header.Get("Content-Type") != "text/plain" {
		t.Errorf("final answer: %+v", got[4].answer)
	}
	// a message cut anywhere is refused, never half applied
	for i := 1; i < len(body); i++ {
		if recs, err := readRecords(body[:i]); err == nil && len(recs) == 5 {
			t.Fatalf("a body cut at %d decoded whole", i)
		}
	}
}

// The cluster block: every option parsed, defaults filled in, and bad
// input refused at the line with what to do.
func TestCaddyfileCluster(t *testing.T) {
	var h Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`sse_fanout http://a {
		cluster nats nats://10.0.0.1:4222 nats://10.0.0.2:4222 {
			name prod-eu
			credentials /etc/nats/user.creds
			tls_ca /etc/nats/ca.pem
			tls_cert /etc/nats/cert.pem
			tls_key /etc/nats/key.pem
			lease 10s
			replicas 3
			max_age 2h
			max_bytes 1GiB
			fallback off
		}
	}`))
	if err != nil {
		t.Fatal(err)
	}
	n := h.Cluster.NATS
	if strings.Join(n.URLs, ",") != "nats://10.0.0.1:4222,nats://10.0.0.2:4222" || n.Name != "prod-eu" || n.Credentials != "/etc/nats/user.creds" ||
		n.TLSCA != "/etc/nats/ca.pem" || n.TLSCert != "/etc/nats/cert.pem" || n.TLSKey != "/etc/nats/key.pem" || n.Replicas != 3 ||
		n.MaxBytes != 1<<30 || !n.NoFallback || time.Duration(n.Lease) != 10*time.Second || time.Duration(n.MaxAge) != 2*time.Hour {
		t.Fatalf("parsed %+v", n)
	}
	// the default max_event_size fits NATS's default max_payload with room
	// for the id, the type and the framing; without a cluster it is 1 MiB
	if d := h.withDefaults(); d.MaxEventSize+2*maxFieldLen+maxLogOverhead != 1<<20 {
		t.Fatalf("with a cluster, max_event_size defaults to %d, over NATS's default max_payload once framed", d.MaxEventSize)
	}
	if d := (Handler{Upstream: "http://a"}).withDefaults(); d.MaxEventSize != 1<<20 {
		t.Fatalf("without a cluster, max_event_size defaults to %d", d.MaxEventSize)
	}
	for _, tc := range []struct{ input, want, line string }{
		{"sse_fanout http://a {\n cluster redis r://x\n}", "the only engine is NATS JetStream", "Testfile:2"},
		{"sse_fanout http://a {\n cluster nats\n}", "at least one NATS URL", "Testfile:2"},
		{"sse_fanout http://a {\n cluster nats nats://x {\n  name has.dot\n }\n}", "letters, digits", "Testfile:3"},
		{"sse_fanout http://a {\n cluster nats nats://x {\n  lease 500ms\n }\n}", "lease must be at least 1s", "Testfile:3"},
		{"sse_fanout http://a {\n cluster nats nats://x {\n  tls_cert c.pem\n }\n}", "tls_cert and tls_key go together", "Testfile:3"},
		// the line of the option to change, not the block's end
		{"sse_fanout http://a {\n cluster nats nats://x {\n  name ok\n  replicas 9\n  lease 3s\n }\n}", "replicas must be between 1 and 5", "Testfile:4"},
		{"sse_fanout http://a {\n cluster nats nats://x {\n  tls_key k.pem\n  name ok\n }\n}", "tls_cert and tls_key go together", "Testfile:3"},
		{"sse_fanout http://a {\n cluster nats nats://x nats:y {\n  name ok\n }\n}", "is not a URL like nats://host:4222", "Testfile:2"},
		{"sse_fanout http://a {\n cluster nats nats://x {\n  bogus 1\n }\n}", `unrecognized cluster option "bogus"`, "Testfile:3"},
		{"sse_fanout http://a {\n cluster nats nats://x {\n  fallback on\n }\n}", "the only value is 'off'", "Testfile:3"},
		{"sse_fanout http://a {\n cluster nats 10.0.0.1:4222\n}", "is not a URL like nats://host:4222", "Testfile:2"},
	} {
		var h Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.line) {
			t.Errorf("%q: error %v, want one containing %q at %s", tc.input, err, tc.want, tc.line)
		}
	}
}
