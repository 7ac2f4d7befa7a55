package ssefanout

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
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

// metricValue reads one series' value from a scrape (0 when absent).
func metricValue(t testing.TB, body, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	return 0
}

// Against a known load, N clients and K events, the counters add up
// exactly: N×K deliveries, one lag sample in lagSampleEvery deliveries,
// the bytes the clients read; the admin view and the status page count the
// same; the fan-out ratio is N. Plaintext clients are written by the fast
// path, the one over HTTP/2 (h2c) by its own goroutine: both count.
func TestMetricsAgainstKnownLoad(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddyWith(t, "protocols h1 h2c", statusSite(o.URL, ""))
	h2c := newH2CTransport(t)

	before := scrape(t, base+"/metrics")
	const n, k = 16, 64 // n×k deliveries, n×k/64 lag samples
	const path = "/base/known"
	var cs []*sseClient
	for range n - 1 {
		cs = append(cs, connect(t, base+"/s/known", nil))
	}
	c, err := tryConnect(h2c, base+"/s/known", nil)
	if err != nil || c.resp.ProtoMajor != 2 {
		t.Fatalf("h2c client: %v", err)
	}
	t.Cleanup(c.close)
	cs = append(cs, c)
	o.waitOpen(t, path, 1, 5*time.Second)
	for i := 1; i <= k; i++ {
		o.send(path, ev(i, strings.Repeat("d", i)))
	}
	for _, c := range cs {
		c.waitFor(t, ev(k, strings.Repeat("d", k)), 10*time.Second)
	}
	var read uint64
	for _, c := range cs {
		read += uint64(len(c.bytes()))
	}
	after := scrape(t, base+"/metrics")
	delta := func(series string) float64 { return metricValue(t, after, series) - metricValue(t, before, series) }
	if d := delta("caddy_sse_fanout_deliveries_total"); d != n*k {
		t.Errorf("deliveries_total rose by %v, want %d", d, n*k)
	}
	if d := delta("caddy_sse_fanout_delivery_lag_seconds_count"); d != n*k/lagSampleEvery {
		t.Errorf("delivery_lag_seconds_count rose by %v, want %d", d, n*k/lagSampleEvery)
	}
	if d := delta("caddy_sse_fanout_events_total"); d != k {
		t.Errorf("events_total rose by %v, want %d", d, k)
	}
	// the event-stream bytes the clients read, without HTTP framing
	if d := delta("caddy_sse_fanout_bytes_sent_total"); uint64(d) != read {
		t.Errorf("bytes_sent_total rose by %v, the clients read %d", d, read)
	}
	if d := metricValue(t, after, "caddy_sse_fanout_direct_clients"); d != n-1 {
		t.Errorf("%v direct clients, want the %d plaintext HTTP/1.1 ones", d, n-1)
	}
	if r := metricValue(t, after, "caddy_sse_fanout_fanout_ratio"); r != n {
		t.Errorf("fanout_ratio is %v, want %d", r, n)
	}
	rec := httptest.NewRecorder()
	if err := (adminStreams{}).serve(rec, httptest.NewRequest(http.MethodGet, "/sse_fanout/streams", nil)); err != nil {
		t.Fatal(err)
	}
	var view []hubStatus
	if err := json.Unmarshal(rec.Body.Bytes(), &view); err != nil || len(view) != 1 || len(view[0].Streams) != 1 {
		t.Fatalf("admin view: %v %s", err, rec.Body)
	}
	s := view[0].Streams[0]
	if s.Deliveries != n*k || s.Events != k || s.BytesSent != read || s.LagSamples != n*k/lagSampleEvery || s.Clients != n {
		t.Fatalf("admin view of the stream: %+v (clients read %d bytes)", s, read)
	}
	if s.LagP99Millis < s.LagP50Millis || s.LagP50Millis <= 0 {
		t.Fatalf("lag quantiles p50 %v p99 %v", s.LagP50Millis, s.LagP99Millis)
	}
	rep := waitStatus(t, base+"/status", func(r statusReport) bool { return len(r.Shown) == 1 })
	if got := rep.Shown[0]; got.Deliveries != n*k || got.BytesSent != read {
		t.Fatalf("status page: %+v", got)
	}
}

// Every metric the README and the Grafana dashboard name exists, and every
// metric the module exposes is in the README's table, so that neither a
// rename nor a new series goes unnoticed.
func TestDocumentedMetricsExist(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))
	exposed := map[string]bool{}
	for _, line := range strings.Split(scrape(t, base+"/metrics"), "\n") {
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" && strings.HasPrefix(f[2], "caddy_sse_fanout_") {
			exposed[f[2]] = true
		}
	}
	if len(exposed) < 20 {
		t.Fatalf("only %d metrics exposed: %v", len(exposed), exposed)
	}
	name := regexp.MustCompile(`caddy_sse_fanout_[a-z0-9_]+`)
	base_ := func(n string) string {
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suffix); ok && exposed[b] {
				return b
			}
		}
		return n
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	dashboard, err := os.ReadFile("dashboards/grafana.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(dashboard, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	inDashboard := map[string]bool{}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			names := name.FindAllString(tg.Expr, -1)
			if len(names) == 0 {
				t.Errorf("dashboard panel %q queries no sse_fanout metric: %s", p.Title, tg.Expr)
			}
			for _, n := range names {
				inDashboard[base_(n)] = true
				if !exposed[base_(n)] {
					t.Errorf("dashboard panel %q names %s, which does not exist", p.Title, n)
				}
			}
		}
	}
	inReadme := map[string]bool{}
	for _, n := range name.FindAllString(string(readme), -1) {
		inReadme[base_(n)] = true
		if !exposed[base_(n)] {
			t.Errorf("the README names %s, which does not exist", n)
		}
	}
	for n := range exposed {
		if !inReadme[n] {
			t.Errorf("%s is not in the README", n)
		}
		if !inDashboard[n] {
			t.Errorf("%s is not on the dashboard", n)
		}
	}
}
