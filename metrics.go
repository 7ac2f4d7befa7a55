package ssefanout

import (
	"errors"
	"fmt"

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
	upstreamConns  prometheus.Gauge
	attempts       *prometheus.CounterVec
	directStalls   prometheus.Counter
	events         prometheus.Counter
	eventsSkipped  prometheus.Counter
	clientsDropped *prometheus.CounterVec
	refused        *prometheus.CounterVec
	resumes        *prometheus.CounterVec
}{
	streams: newGauge("streams",
		"Streams held open, each with one upstream (connected or retrying)."),
	clients: newGauge("clients",
		"Clients attached to a stream."),
	directClients: newGauge("direct_clients",
		"Clients (of those in clients) whose connections the module took over to write them directly: plaintext HTTP/1.1. The others are served through net/http (TLS, HTTP/2, HTTP/3)."),
	directStalls: newCounter("direct_client_stalls_total",
		"Times a directly written client's socket did not take a write at once, and the client moved to a goroutine of its own until it caught up: slow readers or full networks."),
	upstreamConns: newGauge("upstream_connections",
		"Upstream event-stream responses being read."),
	attempts: newCounterVec("upstream_attempts_total",
		"Upstream requests by outcome: stream, transient (unreachable, 429, 502, 503, 504), permanent (any other answer).",
		"outcome", "stream", "transient", "permanent"),
	events: newCounter("events_total",
		"Events received from upstreams (each fanned out to every client of its stream)."),
	eventsSkipped: newCounter("events_skipped_total",
		"Upstream events skipped for being larger than max_event_size."),
	clientsDropped: newCounterVec("clients_dropped_total",
		"Clients disconnected by the proxy: lagging (more than 3/4 of the history behind) or write_timeout (a write stayed blocked for write_timeout).",
		"reason", "lagging", "write_timeout"),
	refused: newCounterVec("requests_refused_total",
		"Requests turned away by a limit: max_clients or max_streams.",
		"limit", "max_clients", "max_streams"),
	resumes: newCounterVec("resumes_total",
		"Clients that sent Last-Event-ID, by whether it was found in the history.",
		"result", "history", "live"),
}

func newGauge(name, help string) prometheus.Gauge {
	return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help})
}

func newCounter(name, help string) prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help})
}

// newCounterVec makes a counter with one label, and creates each of its
// values at zero, so that dashboards and alerts see every series from the
// start rather than after its first event.
func newCounterVec(name, help, label string, values ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}, []string{label})
	for _, v := range values {
		c.WithLabelValues(v)
	}
	return c
}

// registerMetrics adds the collectors to a config's registry; the same
// collectors registered again by a later config are fine.
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		metrics.streams, metrics.clients, metrics.directClients, metrics.upstreamConns, metrics.attempts, metrics.events,
		metrics.eventsSkipped, metrics.directStalls, metrics.clientsDropped, metrics.refused, metrics.resumes,
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
