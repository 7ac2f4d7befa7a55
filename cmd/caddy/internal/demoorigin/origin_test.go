package demoorigin

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		input    string
		interval time.Duration
		backlog  int
		wantErr  string
	}{
		{input: `sse_demo_origin`},
		{input: "sse_demo_origin {\n interval 250ms\n backlog 10\n}", interval: 250 * time.Millisecond, backlog: 10},
		{input: `sse_demo_origin extra`, wantErr: "unexpected argument"},
		{input: "sse_demo_origin {\n interval 0s\n}", wantErr: "positive duration"},
		{input: "sse_demo_origin {\n interval soon\n}", wantErr: "positive duration"},
		{input: "sse_demo_origin {\n backlog 0\n}", wantErr: "at least 1"},
		{input: "sse_demo_origin {\n interval\n}", wantErr: "wrong argument count"},
		{input: "sse_demo_origin {\n interval 1s 2s\n}", wantErr: "wrong argument count"},
		{input: "sse_demo_origin {\n interval 1s\n interval 2s\n}", wantErr: "more than once"},
		{input: "sse_demo_origin {\n speed 2\n}", wantErr: "unrecognized option"},
	}
	for _, tt := range tests {
		var o Origin
		err := o.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("%q: got error %v, want one containing %q", tt.input, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: unexpected error %v", tt.input, err)
			continue
		}
		if time.Duration(o.Interval) != tt.interval || o.Backlog != tt.backlog {
			t.Errorf("%q: got interval %v backlog %d, want %v %d",
				tt.input, time.Duration(o.Interval), o.Backlog, tt.interval, tt.backlog)
		}
	}
}

func TestFirstID(t *testing.T) {
	o := &Origin{Backlog: 3}
	tests := []struct {
		lastID string
		cur    uint64
		want   uint64
	}{
		{"", 10, 10},     // no header: start with the latest event
		{"junk", 10, 10}, // not one of ours
		{"11", 10, 10},   // ahead of us: the origin restarted
		{"10", 10, 11},   // up to date: wait for the next one
		{"8", 10, 9},     // missed two
		{"2", 10, 8},     // missed more than the backlog
		{"0", 2, 1},      // before the first event
	}
	for _, tt := range tests {
		if got := o.firstID(tt.lastID, tt.cur); got != tt.want {
			t.Errorf("firstID(%q, %d) = %d, want %d", tt.lastID, tt.cur, got, tt.want)
		}
	}
}

// TestResume streams from a provisioned origin whose event 10 is the
// latest, resumes after id 7, and checks that stopping the origin (as on a
// server shutdown) ends the response.
func TestResume(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	o := &Origin{Interval: caddy.Duration(time.Hour)}
	if err := o.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	o.epoch = time.Now().Add(-9*time.Hour - time.Minute) // event 10 is the latest
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = o.ServeHTTP(w, r, nil)
	}))
	defer srv.Close()

	reqCtx, stop := context.WithTimeout(context.Background(), 10*time.Second)
	defer stop()
	req, _ := http.NewRequestWithContext(reqCtx, http.MethodGet, srv.URL+"/ticker", nil)
	req.Header.Set("Last-Event-ID", "7")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q, want text/event-stream", ct)
	}
	r := bufio.NewReader(resp.Body)
	var lines []string
	for len(lines) < 7 { // retry, then id and data of events 8, 9 and 10
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: %v", lines, err)
		}
		if line = strings.TrimSuffix(line, "\n"); line != "" {
			lines = append(lines, line)
		}
	}
	// Data lines are checked by prefix: they carry the time and price.
	want := []string{"retry: 2000",
		"id: 8", `data: {"seq":8,"time":"`,
		"id: 9", `data: {"seq":9,"time":"`,
		"id: 10", `data: {"seq":10,"time":"`}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) {
			t.Errorf("line %d: got %q, want %q...", i, lines[i], w)
		}
		if strings.HasPrefix(w, "data: ") && !strings.HasSuffix(lines[i], `,"origin_connections":1}`) {
			t.Errorf("line %d: got %q, want the origin's one connection at its end", i, lines[i])
		}
	}
	if n := o.open.Load(); n != 1 {
		t.Errorf("open connections %d, want 1", n)
	}

	if err := o.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(r); err != nil || string(rest) != "\n" { // the blank line after event 10
		t.Errorf("after Cleanup: read %q, %v; want a clean end of stream", rest, err)
	}
	if n := o.open.Load(); n != 0 {
		t.Errorf("open connections after the end %d, want 0", n)
	}
}
