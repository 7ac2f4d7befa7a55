package ssefanout

import (
	"errors"
	"fmt"
	"slices"

	"github.com/prometheus/client_golang/prometheus"
)

// The metrics' names: caddy_sse_fanout_<name>.
const (
	metricsNamespace = "caddy"
	metricsSubsystem = "sse_fanout"
)

// metrics are process-wide, like the hubs they describe: created once and
// registered with each config's registry. Labels take a handful of fixed
// values; stream URLs never become labels.
var metrics = struct {
	streams        prometheus.Gauge
	clients        prometheus.Gauge
	directClients  prometheus.Gauge
	upstreamConns  *prometheus.GaugeVec
	attempts       *prometheus.CounterVec
	directStalls   prometheus.Counter
	events         prometheus.Counter
	deliveries     prometheus.Counter
	bytesSent      prometheus.Counter
	deliveryLag    prometheus.Histogram
	upstreamUptime prometheus.Histogram
	eventsSkipped  prometheus.Counter
	clientsDropped *prometheus.CounterVec
	refused        *prometheus.CounterVec
	resumes        *prometheus.CounterVec
	resumeGaps     *prometheus.CounterVec

	clusterStreams     *prometheus.GaugeVec
	clusterTakeovers   prometheus.Counter
	clusterTakeoverGap prometheus.Counter
	clusterFenced      prometheus.Counter
	clusterRejoinGaps  prometheus.Counter
}{
	streams: newGauge("streams",
		"Streams held open, each with one upstream (connected or retrying)."),
	clients: newGauge("clients",
		"Clients attached to a stream."),
	directClients: newGauge("direct_clients",
		"Clients (of those in clients) whose connections the module took over to write them directly: plaintext HTTP/1.1. The others are served through net/http (TLS, HTTP/2, HTTP/3)."),
	directStalls: newCounter("direct_client_stalls_total",
		"Times a directly written client's socket did not take a write at once, and the client moved to a goroutine of its own until it caught up: slow readers or full networks."),
	upstreamConns: newGaugeVec("upstream_connections",
		"Upstream event-stream responses being read, by source: stream (a stream's shared connection) or catch_up (a resuming client's).",
		"source", sourceStream, sourceCatchUp),
	attempts: newCounterVec("upstream_attempts_total",
		"Upstream requests by source (stream, catch_up) and outcome: stream, transient (unreachable, 429, 502, 503, 504), permanent (any other answer).",
		[]string{"source", "outcome"}, []string{sourceStream, sourceCatchUp}, []string{"stream", "transient", "permanent"}),
	events: newCounter("events_total",
		"Events published into streams' histories: from their upstreams, or from the cluster's log (each fanned out to every client of its stream)."),
	deliveries: newCounter("deliveries_total",
		"Events written to clients: an event of a stream with N clients counts N."),
	bytesSent: newCounter("bytes_sent_total",
		"Bytes of events, ids, retry lines and keepalives written to clients after their response heads."),
	deliveryLag: prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "delivery_lag_seconds",
		Help:    "Time from an event's publication into its stream's history (right after it was read upstream, or applied from the cluster's log) to the end of its write to a client, for one delivery in 64 of events published while the client was connected (sampled deterministically, so that it costs nothing measurable).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 15),
	}),
	upstreamUptime: prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "upstream_connection_duration_seconds",
		Help:    "How long streams' upstream connections (or, on a cluster follower, the stream's log) stayed live, observed when they end.",
		Buckets: []float64{1, 10, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600},
	}),
	eventsSkipped: newCounter("events_skipped_total",
		"Upstream events skipped: data over max_event_size, a type or id over its 4 KiB bound, or in a cluster a log message over NATS's max_payload."),
	clientsDropped: newCounterVec("clients_dropped_total",
		"Clients disconnected by the proxy: lagging (more than 3/4 of the history behind) or write_timeout (a write stayed blocked for write_timeout).",
		[]string{"reason"}, []string{"lagging", "write_timeout"}),
	refused: newCounterVec("requests_refused_total",
		"Requests turned away by a limit: max_clients or max_streams.",
		[]string{"limit"}, []string{"max_clients", "max_streams"}),
	resumes: newCounterVec("resumes_total",
		"Clients that sent Last-Event-ID, by how they resumed: history (found in it), catch_up (caught up from the origin and spliced), live (with a gap: see resume_gaps_total).",
		[]string{"result"}, []string{"history", "catch_up", "live"}),
	resumeGaps: newCounterVec("resume_gaps_total",
		"Resumes that could not give the client every event after its Last-Event-ID, by reason: not_found (no catch-up to ask: catch_up off, assign_ids, or the stream not live), no_slot (the catch-up bounds kept it out for 2 s), catch_up_failed (the origin answered no event stream), unmet (the ids did not meet within catch_up_timeout or catch_up_events), origin_ignored (the catch-up started at the live head).",
		[]string{"reason"}, []string{gapNotFound, gapNoSlot, gapFailed, gapUnmet, gapOriginIgnore}),

	clusterStreams: newGaugeVec("cluster_streams",
		"Clustered streams open on this node, by its role: holder (it holds the stream's upstream and writes the log), follower (it follows the log), fallback (NATS out of reach: its own upstream).",
		"role", "holder", "follower", "fallback"),
	clusterTakeovers: newCounter("cluster_takeovers_total",
		"Streams this node took over from another holder (whose lease had lapsed)."),
	clusterTakeoverGap: newCounter("cluster_takeover_gap_events_total",
		"Events an origin sent between a holder's end and its successor's first event, as far as numeric ids tell: an origin that ignores Last-Event-ID starts its new connection from its live head."),
	clusterFenced: newCounter("cluster_fenced_total",
		"Times this node, holding a stream, found that another node had taken it over (a write to the log or a refresh of the lease refused, as after a pause): its upstream closed at once."),
	clusterRejoinGaps: newCounter("cluster_rejoin_gaps_total",
		"Rejoins after a fall-back whose last id the log did not have: the stream went on from the log with a gap."),
}

func newGauge(name, help string) prometheus.Gauge {
	return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help})
}

func newCounter(name, help string) prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help})
}

// newCounterVec makes a counter with labels, and creates every
// combination of their values (values[i] for labels[i]) at zero, so that
// dashboards and alerts see every series from the start rather than after
// its first event.
func newCounterVec(name, help string, labels []string, values ...[]string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}, labels)
	for _, combo := range combinations(values) {
		c.WithLabelValues(combo...)
	}
	return c
}

// newGaugeVec makes a gauge with one label, each of its values at zero.
func newGaugeVec(name, help, label string, values ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}, []string{label})
	for _, v := range values {
		g.WithLabelValues(v)
	}
	return g
}

// combinations returns every choice of one value from each list.
func combinations(lists [][]string) [][]string {
	out := [][]string{nil}
	for _, list := range lists {
		var next [][]string
		for _, prefix := range out {
			for _, v := range list {
				next = append(next, append(slices.Clone(prefix), v))
			}
		}
		out = next
	}
	return out
}

// registerMetrics adds the collectors to a config's registry; the same
// collectors registered again by a later config are fine.
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		metrics.streams, metrics.clients, metrics.directClients, metrics.upstreamConns, metrics.attempts, metrics.events,
		metrics.deliveries, metrics.bytesSent, metrics.deliveryLag, metrics.upstreamUptime, fanoutRatio,
		metrics.eventsSkipped, metrics.directStalls, metrics.clientsDropped, metrics.refused, metrics.resumes, metrics.resumeGaps,
		metrics.clusterStreams, metrics.clusterTakeovers, metrics.clusterTakeoverGap, metrics.clusterFenced, metrics.clusterRejoinGaps,
	} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return fmt.Errorf("registering metrics: %v", err)
			}
		}
	}
	return nil
}

// fanoutRatio is the clients per upstream connection this process holds
// open, computed when scraped: how many requests each origin connection
// stands for. Streams that a cluster node follows from another node's
// upstream count neither clients nor connections here. 0 while none is
// open, never a division by zero.
var fanoutRatio = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
	Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "fanout_ratio",
	Help: "Clients per upstream connection open in this process (streams followed from another cluster node's upstream excluded): the origin load the module saves. 0 while none is open.",
}, func() float64 {
	clients, open := 0, 0
	hubs.Range(func(_, v any) bool {
		for _, s := range v.(*hub).snapshotStreams() {
			if s.upstreamOpenHere() {
				open++
				clients += s.clientCount()
			}
		}
		return true
	})
	if open == 0 {
		return 0
	}
	return float64(clients) / float64(open)
})
