package ssefanout

import (
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
)

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
