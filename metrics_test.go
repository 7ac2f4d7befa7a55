package ssefanout

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	dto "github.com/prometheus/client_model/go"
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
	cs = append(cs, connectH2(t, h2c, base+"/s/known"))
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

// histCount returns how many observations a histogram holds.
func histCount(t testing.TB, h interface{ Write(*dto.Metric) error }) uint64 {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// A stream closed while live (its last client left and the linger ran
// out) ends its upstream connection: the connection's duration is
// observed, as for one the origin ended.
func TestUpstreamDurationObservedWhenStreamCloses(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `sse_fanout /s/* `+o.URL+` {
		linger 50ms
	}`)
	before := histCount(t, metrics.upstreamUptime)
	c := connect(t, base+"/s/closing", nil)
	o.waitOpen(t, "/s/closing", 1, 5*time.Second)
	o.send("/s/closing", ev(1, "x"))
	c.waitFor(t, ev(1, "x"), 5*time.Second)
	c.close()
	o.waitOpen(t, "/s/closing", 0, 5*time.Second)
	eventually(t, 2*time.Second, func() bool { return histCount(t, metrics.upstreamUptime) == before+1 }, func() string {
		return "upstream_connection_duration_seconds was not observed when the stream closed"
	})
}

// bytes_sent counts every event-stream byte written to clients after
// their heads: a late client's first write (the origin's retry and the
// committed id) and the id a client resuming live with a gap gets count as
// much as events. The stream's count equals what its clients read.
func TestBytesSentCountsPreludes(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `sse_fanout /s/* `+o.URL+` {
		keepalive 1m
		max_catch_ups off
	}`)
	const path = "/s/prelude"
	first := connect(t, base+path, nil)
	o.waitOpen(t, path, 1, 5*time.Second)
	o.send(path, "retry: 1500\n\n")
	o.send(path, ev(1, "x"))
	first.waitFor(t, ev(1, "x"), 5*time.Second)
	late := connect(t, base+path, nil)                                      // gets retry and id 1 first
	gap := connect(t, base+path, http.Header{"Last-Event-ID": {"unknown"}}) // live with a gap: gets id 1 first
	late.waitFor(t, "id: 1\n", 5*time.Second)
	gap.waitFor(t, "id: 1\n", 5*time.Second)
	o.send(path, ev(2, "y"))
	cs := []*sseClient{first, late, gap}
	for _, c := range cs {
		c.waitFor(t, ev(2, "y"), 5*time.Second)
	}
	s := findStream(t, path)
	var read uint64
	for _, c := range cs {
		read += uint64(len(c.bytes()))
	}
	eventually(t, 2*time.Second, func() bool { return s.stats.bytes.Load() == read }, func() string {
		return fmt.Sprintf("the stream counted %d bytes sent, its clients read %d (%q, %q, %q)",
			s.stats.bytes.Load(), read, first.bytes(), late.bytes(), gap.bytes())
	})
}

// The delivery lag measures how long the proxy takes to pass live events
// on, not how long a client was away: events a resuming client gets from
// the history (published before it came back) are not lag samples, as
// those of a catch-up are not.
func TestLagExcludesHistoryResumes(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, `sse_fanout /s/* `+o.URL+` {
		keepalive 1m
	}`)
	const path = "/s/lag"
	const k = 2 * lagSampleEvery
	live := connect(t, base+path, nil)
	o.waitOpen(t, path, 1, 5*time.Second)
	for i := 1; i <= k; i++ {
		o.send(path, ev(i, "x"))
	}
	live.waitFor(t, ev(k, "x"), 5*time.Second)
	time.Sleep(time.Second) // the resuming client was away a second
	back := connect(t, base+path, http.Header{"Last-Event-ID": {"1"}})
	back.waitFor(t, ev(k, "x"), 5*time.Second)
	s := findStream(t, path)
	s.stats.lagMu.Lock()
	defer s.stats.lagMu.Unlock()
	if s.stats.lags == nil {
		t.Fatal("no lag sample")
	}
	for i, lag := range s.stats.lags[:min(s.stats.lagN, lagSamples)] {
		if lag >= 0.5 {
			t.Errorf("lag sample %d is %.3fs: the time the client was away, not a delivery lag", i, lag)
		}
	}
}

// deadlineFlusher is a net/http response whose writes are buffered and
// whose flush fails on a passed write deadline, as TLS HTTP/1.1's does
// for an event smaller than its buffer.
type deadlineFlusher struct{ httptest.ResponseRecorder }

func (*deadlineFlusher) FlushError() error                { return os.ErrDeadlineExceeded }
func (*deadlineFlusher) SetWriteDeadline(time.Time) error { return nil }

// A client served through net/http whose flush runs out of write_timeout
// is dropped for write_timeout, and counted so, as one whose write did.
func TestWriteTimeoutOnFlushCounts(t *testing.T) {
	h := &Handler{WriteTimeout: caddy.Duration(time.Second), logger: zap.NewNop()}
	s := &stream{name: "x"}
	w := &deadlineFlusher{}
	c := &client{h: h, s: s, w: w, rc: http.NewResponseController(w)}
	err := c.write([]byte("data: x\n\n"))
	if writeEnd(err) != endWriteTimeout {
		t.Fatalf("write ended %q (%v), want %q", writeEnd(err), err, endWriteTimeout)
	}
	if n := s.stats.dropped[dropWriteTimeout].Load(); n != 1 {
		t.Fatalf("%d write_timeout drops counted, want 1", n)
	}
}

// logMsg is a log message as a follower's consumer delivers it.
type logMsg struct {
	jetstream.Msg
	hdr  nats.Header
	data []byte
}

func (m *logMsg) Headers() nats.Header { return m.hdr }
func (m *logMsg) Data() []byte         { return m.data }

// A node that opens a clustered stream loads the log's past, where the
// holder's reconnects are answers (live, retrying, live): replaying them
// ends no upstream connection now, and must not be observed as
// connections of no duration.

func TestClusterLoadObservesNoUpstreamDuration(t *testing.T) {
	s := &stream{name: "x", ready: make(chan struct{})}
	c := &clusterSource{s: s, digest: "d", progress: make(chan struct{}, 1)}
	before := histCount(t, metrics.upstreamUptime)
	for i, st := range []streamState{stateLive, stateRetrying, stateLive, stateRetrying, stateLive} {
		a := answer{state: st}
		msg := &logMsg{hdr: nats.Header{hdrDigest: {"d"}}, data: appendRecord(nil, logRecord{answer: &a})}
		c.apply(msg, &jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: uint64(i + 1)}}, s, "", true)
	}
	if n := histCount(t, metrics.upstreamUptime) - before; n != 0 {
		t.Fatalf("loading the log's past observed %d upstream connection durations", n)
	}
	if s.stats.liveSince.Load() == 0 {
		t.Fatal("the stream is not live after the log's last answer (live)")
	}
}
