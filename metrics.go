package ssefanout

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are process-wide, like the hubs they describe: created once and
// registered with each config's registry. Labels take a handful of fixed
// values; stream URLs never become labels.
var metrics = struct {
	streams        prometheus.Gauge
	clients        prometheus.Gauge
	upstreamConns  prometheus.Gauge
	attempts       *prometheus.CounterVec
	events         prometheus.Counter
	eventsSkipped  prometheus.Counter
	clientsDropped *prometheus.CounterVec
	refused        *prometheus.CounterVec
	resumes        *prometheus.CounterVec
}{
	streams: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "streams",
		Help: "Streams held open, each with one upstream (connected or retrying).",
	}),
	clients: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "clients",
		Help: "Clients attached to a stream.",
	}),
	upstreamConns: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "upstream_connections",
		Help: "Upstream event-stream responses being read.",
	}),
	attempts: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "upstream_attempts_total",
		Help: "Upstream requests by outcome: stream, transient (unreachable, 429, 502, 503, 504), permanent (any other answer).",
	}, []string{"outcome"}),
	events: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "events_total",
		Help: "Events received from upstreams (each fanned out to every client of its stream).",
	}),
	eventsSkipped: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "events_skipped_total",
		Help: "Upstream events skipped for being larger than max_event_size.",
	}),
	clientsDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "clients_dropped_total",
		Help: "Clients disconnected by the proxy: lagging (more than 3/4 of the history behind) or write (a write failed or timed out).",
	}, []string{"reason"}),
	refused: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "requests_refused_total",
		Help: "Requests turned away by a limit: max_clients or max_streams.",
	}, []string{"limit"}),
	resumes: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "sse_fanout", Name: "resumes_total",
		Help: "Clients that sent Last-Event-ID, by whether it was found in the history.",
	}, []string{"result"}),
}

// registerMetrics adds the collectors to a config's registry; the same
// collectors registered again by a later config are fine.
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{
		metrics.streams, metrics.clients, metrics.upstreamConns, metrics.attempts, metrics.events,
		metrics.eventsSkipped, metrics.clientsDropped, metrics.refused, metrics.resumes,
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
