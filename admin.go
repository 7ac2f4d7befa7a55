package ssefanout

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminStreams{})
}

// adminStreams serves GET /sse_fanout/streams on Caddy's admin API: the
// live hubs and their streams, for operators to see what the origin is
// being asked for and by how many clients. Stream keys may hold credentials
// (vary values), so streams are named by their key's hash and upstream path
// only, never by query or header values.
type adminStreams struct{}

// CaddyModule returns the Caddy module information.
func (adminStreams) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.sse_fanout",
		New: func() caddy.Module { return new(adminStreams) },
	}
}

// Routes returns the admin route.
func (a adminStreams) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/sse_fanout/streams", Handler: caddy.AdminHandlerFunc(a.serve)}}
}

// hubStatus is one hub in the admin view.
type hubStatus struct {
	Upstream string         `json:"upstream"`
	Vary     []string       `json:"vary,omitempty"`
	Cluster  *clusterStatus `json:"cluster,omitempty"`
	Streams  []streamStatus `json:"streams"`
}

// clusterStatus is a hub's cluster in the admin view.
type clusterStatus struct {
	Name      string `json:"name"`
	Node      string `json:"node"`
	Connected bool   `json:"connected"`
	Ready     bool   `json:"ready"`
	Epoch     string `json:"epoch,omitempty"`
	Warning   string `json:"warning,omitempty"`
}

// streamStatus is one stream in the admin view and on the status page.
// Counters count from the stream's start; the status page adds rates.
type streamStatus struct {
	// Stream is a hash of the stream's key: stable, and never the
	// expanded path, query or vary values, which can hold credentials.
	Stream        string  `json:"stream"`
	State         string  `json:"state"`
	UptimeSeconds float64 `json:"uptime_seconds"`
	Clients       int     `json:"clients"`
	// UpstreamHere says whether this process holds the stream's upstream
	// connection open: it is live and not followed from another cluster
	// node's upstream.
	UpstreamHere    bool              `json:"upstream_here"`
	HistoryEvents   int               `json:"history_entries"`
	HistoryCapacity int               `json:"history_capacity"`
	HistoryBytes    int64             `json:"history_bytes"`
	HistoryMaxBytes int64             `json:"history_max_bytes"`
	Published       uint64            `json:"published"`
	Events          uint64            `json:"events_total"`
	Deliveries      uint64            `json:"deliveries_total"`
	BytesSent       uint64            `json:"bytes_sent_total"`
	Dropped         map[string]uint64 `json:"dropped"`
	Resumes         map[string]uint64 `json:"resumes"`
	CatchUps        int               `json:"catch_ups"`
	CatchUpsTotal   uint64            `json:"catch_ups_total"`
	LagP50Millis    float64           `json:"lag_p50_ms"`
	LagP99Millis    float64           `json:"lag_p99_ms"`
	LagSamples      int               `json:"lag_samples"`
	RetryMillis     *int64            `json:"origin_retry_ms,omitempty"` // nil: none sent (0 is a value)
	LastEventIDLen  int               `json:"last_event_id_length"`
	ClusterRole     string            `json:"cluster_role,omitempty"`
	ClusterHolder   string            `json:"cluster_holder,omitempty"`
}

func (adminStreams) serve(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method not allowed")}
	}
	out := []hubStatus{}
	hubs.Range(func(_, v any) bool {
		out = append(out, v.(*hub).status())
		return true
	})
	slices.SortFunc(out, func(a, b hubStatus) int { return strings.Compare(a.Upstream, b.Upstream) })
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(out)
}

// status describes the hub and its streams.
func (h *hub) status() hubStatus {
	hs := hubStatus{Upstream: h.tmpl.raw, Vary: h.vary, Streams: []streamStatus{}}
	if c := h.cluster; c != nil {
		_, _, _, epoch := c.objects()
		c.mu.Lock()
		hs.Cluster = &clusterStatus{Name: c.cfg.Name, Node: nodeID, Connected: c.link.connected(), Ready: c.ready, Epoch: epoch, Warning: c.warning}
		c.mu.Unlock()
	}
	h.mu.Lock()
	set := h.active.settings
	streams := make([]*stream, 0, len(h.streams))
	clients := make([]int, 0, len(h.streams))
	for _, s := range h.streams {
		streams = append(streams, s)
		clients = append(clients, s.clients)
	}
	h.mu.Unlock()
	for i, s := range streams {
		hs.Streams = append(hs.Streams, s.status(clients[i], set))
	}
	slices.SortFunc(hs.Streams, func(a, b streamStatus) int { return strings.Compare(a.Stream, b.Stream) })
	return hs
}

// status describes the stream, which has the given clients, under the
// hub's settings in force.
func (s *stream) status(clients int, set hubSettings) streamStatus {
	st := &s.stats
	s.cuMu.Lock()
	catchUps := len(s.catchUps)
	s.cuMu.Unlock()
	p50, p99, n := st.lagQuantiles()
	out := streamStatus{
		Stream:          s.name,
		Clients:         clients,
		UpstreamHere:    s.upstreamOpenHere(),
		HistoryCapacity: set.history,
		HistoryMaxBytes: set.historyBytes,
		Events:          st.events.Load(),
		Deliveries:      st.deliveries.Load(),
		BytesSent:       st.bytes.Load(),
		Dropped:         make(map[string]uint64, len(dropNames)),
		Resumes:         make(map[string]uint64, len(resumeNames)),
		CatchUps:        catchUps,
		CatchUpsTotal:   st.catchUps.Load(),
		LagP50Millis:    p50 * 1000,
		LagP99Millis:    p99 * 1000,
		LagSamples:      n,
	}
	if since := st.liveSince.Load(); since != 0 {
		out.UptimeSeconds = time.Since(time.Unix(0, since)).Seconds()
	}
	for k, name := range dropNames {
		out.Dropped[name] = st.dropped[k].Load()
	}
	for k, name := range resumeNames {
		out.Resumes[name] = st.resumes[k].Load()
	}
	if cs, ok := s.src.(*clusterSource); ok {
		role := cs.role.Load()
		out.ClusterRole = roleNames[role]
		if n := cs.holder.Load(); n != nil {
			out.ClusterHolder = *n
		}
	}
	s.mu.RLock()
	out.State = s.state.String()
	out.HistoryEvents = s.hist.count
	out.HistoryBytes = s.hist.bytes
	out.Published = s.hist.head
	if s.hasRetry {
		retry := s.retry
		out.RetryMillis = &retry
	}
	out.LastEventIDLen = len(s.lastID)
	s.mu.RUnlock()
	return out
}

// Interface guard
var _ caddy.AdminRouter = adminStreams{}
