package ssefanout

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"

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

// streamStatus is one stream in the admin view.
type streamStatus struct {
	Stream         string `json:"stream"`
	State          string `json:"state"`
	Clients        int    `json:"clients"`
	HistoryEvents  int    `json:"history_entries"`
	HistoryBytes   int64  `json:"history_bytes"`
	Published      uint64 `json:"published"`
	RetryMillis    int64  `json:"origin_retry_ms,omitempty"`
	LastEventIDLen int    `json:"last_event_id_length"`
	CatchUps       int    `json:"catch_ups"`
	ClusterRole    string `json:"cluster_role,omitempty"`
	ClusterHolder  string `json:"cluster_holder,omitempty"`
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
	h.mu.Lock()
	hs := hubStatus{Upstream: h.tmpl.raw, Vary: h.vary, Streams: []streamStatus{}}
	if c := h.cluster; c != nil {
		_, _, _, epoch := c.objects()
		c.mu.Lock()
		hs.Cluster = &clusterStatus{Name: c.cfg.Name, Node: nodeID, Connected: c.link.connected(), Ready: c.ready, Epoch: epoch, Warning: c.warning}
		c.mu.Unlock()
	}
	streams := make([]*stream, 0, len(h.streams))
	clients := make([]int, 0, len(h.streams))
	for _, s := range h.streams {
		streams = append(streams, s)
		clients = append(clients, s.clients)
	}
	h.mu.Unlock()
	for i, s := range streams {
		s.cuMu.Lock()
		catchUps := len(s.catchUps)
		s.cuMu.Unlock()
		s.mu.RLock()
		role, holder := "", ""
		if cs, ok := s.src.(*clusterSource); ok {
			role = roleNames[cs.role.Load()]
			if n := cs.holder.Load(); n != nil {
				holder = *n
			}
		}
		hs.Streams = append(hs.Streams, streamStatus{
			Stream:         s.name,
			State:          s.state.String(),
			Clients:        clients[i],
			HistoryEvents:  s.hist.count,
			HistoryBytes:   s.hist.bytes,
			Published:      s.hist.head,
			RetryMillis:    s.retry,
			LastEventIDLen: len(s.lastID),
			CatchUps:       catchUps,
			ClusterRole:    role,
			ClusterHolder:  holder,
		})
		s.mu.RUnlock()
	}
	slices.SortFunc(hs.Streams, func(a, b streamStatus) int { return strings.Compare(a.Stream, b.Stream) })
	return hs
}

// Interface guard
var _ caddy.AdminRouter = adminStreams{}
