package ssefanout

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// No log line, at any level, holds an upstream URL, its query, a vary
// value or a redirect's Location: they can hold credentials and tenant
// names. Every failure path the upstream can take is driven at debug level
// with secrets in each of those places, and the whole log is scanned.
func TestLogsCarryNoURLs(t *testing.T) {
	leakCheck(t)
	logFile := filepath.Join(t.TempDir(), "caddy.log")

	// the origin misbehaves in a different way on each path
	o := newOrigin(t)
	o.setHandler(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		switch {
		case strings.HasSuffix(p, "/loop"):
			http.Redirect(w, r, r.URL.Path+"?next=SECRET-LOCATION-1", http.StatusFound)
		case strings.HasSuffix(p, "/away"):
			http.Redirect(w, r, "http://127.0.0.2:9/SECRET-LOCATION-2", http.StatusFound)
		case strings.HasSuffix(p, "/html"):
			w.Header().Set("Content-Type", "text/html")
			_, _ = io.WriteString(w, "<p>SECRET-BODY</p>")
		case strings.HasSuffix(p, "/gone"):
			http.Error(w, "gone", http.StatusGone)
		case strings.HasSuffix(p, "/busy"):
			w.Header().Set("Retry-After", "1")
			http.Error(w, "busy", http.StatusServiceUnavailable)
		case strings.HasSuffix(p, "/big"):
			w.Header().Set("Content-Type", "text/event-stream")
			_, _ = io.WriteString(w, "id: 1\ndata: "+strings.Repeat("x", 4096)+"\n\ndata: small\n\n")
		case strings.HasSuffix(p, "/silent"):
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusOK)
			http.NewResponseController(w).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(3 * time.Second):
			}
		case strings.HasSuffix(p, "/drops"):
			w.Header().Set("Content-Type", "text/event-stream")
			_, _ = io.WriteString(w, "id: SECRET-ID\nretry: 200\ndata: then the origin drops\n\n")
		default:
			o.stream(w, r)
		}
	})
	closed := freePort(t) // nothing listens here

	port := freePort(t)
	cfg := fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	grace_period 2s
	log {
		output file %s
		level DEBUG
	}
}
http://127.0.0.1:%d {
	bind 127.0.0.1
	handle /down/* {
		sse_fanout "http://127.0.0.1:%d/tenants/{http.request.header.X-Tenant}?key=SECRET-BASE-QUERY" {
			vary Authorization
			linger off
			status_wait 200ms
		}
	}
	handle /full/* {
		sse_fanout "%s/tenants/{http.request.header.X-Tenant}?key=SECRET-BASE-QUERY" {
			max_clients 1
			linger off
		}
	}
	handle {
		sse_fanout "%s/tenants/{http.request.header.X-Tenant}?key=SECRET-BASE-QUERY" {
			vary Authorization
			linger off
			status_wait 500ms
			max_event_size 1KiB
			history_bytes 16KiB
			upstream_idle_timeout 500ms
			transport http {
				response_header_timeout 500ms
			}
		}
	}
}
`, logFile, port, closed, o.URL, o.URL)
	loadCaddyfile(t, cfg)
	t.Cleanup(func() { _ = caddy.Stop() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitUp(t, base)

	secrets := []string{"X-Tenant: SECRET-TENANT", "Authorization: Bearer SECRET-VARY", "Last-Event-ID: SECRET-RESUME"}
	for _, path := range []string{"/down/x", "/loop", "/away", "/html", "/gone", "/busy", "/big", "/silent", "/drops", "/ok", "/..;/x", "/a%00"} {
		resp, conn := rawGet(t, base, path+"?token=SECRET-QUERY", secrets...)
		// read a little of each answer, enough for the failure to happen
		_ = conn.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
		_, _ = io.Copy(io.Discard, resp.Body)
		conn.Close()
	}
	// a client past max_clients is refused (and logged at debug level)
	_, held := rawGet(t, base, "/full/x?token=SECRET-QUERY", secrets...)
	resp, conn := rawGet(t, base, "/full/x?token=SECRET-QUERY", secrets...)
	_ = conn.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
	_, _ = io.Copy(io.Discard, resp.Body)
	conn.Close()
	held.Close()
	// let the retries and timeouts log
	time.Sleep(1500 * time.Millisecond)
	_ = caddy.Stop()

	f, err := os.Open(logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lines, module := 0, 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		lines++
		if strings.Contains(line, "sse_fanout") {
			module++
		}
		if strings.Contains(line, "SECRET") {
			t.Errorf("log line holds a URL, query, vary value or Location:\n%s", line)
		}
	}
	if module < 5 {
		t.Fatalf("only %d module log lines in %d: the failure paths were not logged at debug level", module, lines)
	}
	for _, want := range []string{"connection refused", "stopped after 10 redirects", "another host", "text/html", "larger than max_event_size",
		"request refused: it maps to no valid upstream URL", "request refused: a limit is reached"} {
		data, _ := os.ReadFile(logFile)
		if !strings.Contains(string(data), want) {
			t.Errorf("no log line names the cause %q", want)
		}
	}
}
