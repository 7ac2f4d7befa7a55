package ssefanout

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestAdminStreams(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, "sse_fanout "+o.URL+"/base {\n vary Authorization\n linger 100ms\n}")
	hdr := http.Header{"Authorization": {"Bearer secret-token"}}
	c1 := connect(t, base+"/s?token=quiz-zq", hdr)
	connect(t, base+"/s?token=quiz-zq", hdr)
	o.waitOpen(t, "/base/s?token=quiz-zq", 1, 5*time.Second)
	o.send("/base/s?token=quiz-zq", ev(1, "x"))
	c1.waitFor(t, ev(1, "x"), 5*time.Second)

	rec := httptest.NewRecorder()
	if err := (adminStreams{}).serve(rec, httptest.NewRequest(http.MethodGet, "/sse_fanout/streams", nil)); err != nil {
		t.Fatal(err)
	}
	body := rec.Body.String()
	// the query value has letters no hex stream name holds, so that the
	// check cannot match a name by chance
	if strings.Contains(body, "secret-token") || strings.Contains(body, "quiz-zq") {
		t.Fatalf("admin view leaks vary or query values: %s", body)
	}
	var got []hubStatus
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatalf("%v: %s", err, body)
	}
	if len(got) != 1 || got[0].Upstream != o.URL+"/base" || len(got[0].Streams) != 1 {
		t.Fatalf("unexpected view: %s", body)
	}
	s := got[0].Streams[0]
	if strings.Contains(body, "/base/s") {
		t.Fatalf("admin view shows an expanded path, which can hold request data: %s", body)
	}
	if s.State != "live" || s.Clients != 2 || s.Published != 1 || s.HistoryEvents != 1 || s.LastEventIDLen != 1 {
		t.Fatalf("unexpected stream status: %+v", s)
	}
	rec = httptest.NewRecorder()
	if err := (adminStreams{}).serve(rec, httptest.NewRequest(http.MethodPost, "/sse_fanout/streams", nil)); err == nil {
		t.Fatal("POST accepted")
	}
}
