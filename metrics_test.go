package ssefanout

import (
	"io"
	"net/http"
	"strings"
	"testing"
)

// scrape returns what Caddy's metrics handler at base+path serves.
func scrape(t testing.TB, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}

// Every labelled series exists, at zero, before its first event: an alert
// on `rate(...{reason="write_timeout"}[5m]) > 0` must see the series from
// the start.
func TestMetricsExistFromTheStart(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `handle /metrics {
		metrics
	}
	handle {
		sse_fanout `+o.URL+`
	}`)
	body := scrape(t, base+"/metrics")
	for _, series := range []string{
		`caddy_sse_fanout_upstream_attempts_total{outcome="stream",source="stream"}`,
		`caddy_sse_fanout_upstream_attempts_total{outcome="transient",source="stream"}`,
		`caddy_sse_fanout_upstream_attempts_total{outcome="permanent",source="stream"}`,
		`caddy_sse_fanout_upstream_attempts_total{outcome="stream",source="catch_up"}`,
		`caddy_sse_fanout_upstream_attempts_total{outcome="transient",source="catch_up"}`,
		`caddy_sse_fanout_upstream_attempts_total{outcome="permanent",source="catch_up"}`,
		`caddy_sse_fanout_clients_dropped_total{reason="lagging"}`,
		`caddy_sse_fanout_clients_dropped_total{reason="write_timeout"}`,
		`caddy_sse_fanout_requests_refused_total{limit="max_clients"}`,
		`caddy_sse_fanout_requests_refused_total{limit="max_streams"}`,
		`caddy_sse_fanout_resumes_total{result="history"}`,
		`caddy_sse_fanout_resumes_total{result="catch_up"}`,
		`caddy_sse_fanout_resumes_total{result="live"}`,
		`caddy_sse_fanout_resume_gaps_total{reason="not_found"}`,
		`caddy_sse_fanout_resume_gaps_total{reason="no_slot"}`,
		`caddy_sse_fanout_resume_gaps_total{reason="catch_up_failed"}`,
		`caddy_sse_fanout_resume_gaps_total{reason="unmet"}`,
		`caddy_sse_fanout_resume_gaps_total{reason="origin_ignored"}`,
		`caddy_sse_fanout_streams`,
		`caddy_sse_fanout_clients`,
		`caddy_sse_fanout_direct_clients`,
		`caddy_sse_fanout_direct_client_stalls_total`,
		`caddy_sse_fanout_upstream_connections{source="stream"}`,
		`caddy_sse_fanout_upstream_connections{source="catch_up"}`,
		`caddy_sse_fanout_events_total`,
		`caddy_sse_fanout_events_skipped_total`,
	} {
		if !strings.Contains(body, "\n"+series+" ") {
			t.Errorf("series %s missing from /metrics before any event", series)
		}
	}
	if strings.Contains(body, "write\"") {
		t.Error("a stale label value is exposed")
	}
	if !strings.Contains(body, "write_timeout (a write stayed blocked") {
		t.Error("clients_dropped_total's help does not describe write_timeout")
	}
}
