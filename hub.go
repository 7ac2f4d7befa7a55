package ssefanout

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"go.uber.org/zap"
)

// hubs holds one hub per handler identity. It outlives config reloads, so
// that a reload which keeps a handler's identity keeps its upstream
// connections and histories.
var hubs = caddy.NewUsagePool()

// hubSettings are the options that shape a hub's streams rather than one
// client's view of them. They apply to a surviving hub only once the config
// that sets them serves requests.
type hubSettings struct {
	history      int
	historyBytes int64
	maxEventSize int64
	linger       time.Duration
	maxStreams   int
	idleTimeout  time.Duration
}

// diff names the first setting that differs, with both values.
func (a hubSettings) diff(b hubSettings) (name string, va, vb any) {
	switch {
	case a.history != b.history:
		return "history", a.history, b.history
	case a.historyBytes != b.historyBytes:
		return "history_bytes", a.historyBytes, b.historyBytes
	case a.maxEventSize != b.maxEventSize:
		return "max_event_size", a.maxEventSize, b.maxEventSize
	case a.linger != b.linger:
		return "linger", a.linger, b.linger
	case a.maxStreams != b.maxStreams:
		return "max_streams", a.maxStreams, b.maxStreams
	case a.idleTimeout != b.idleTimeout:
		return "upstream_idle_timeout", a.idleTimeout, b.idleTimeout
	}
	return "", nil, nil
}

// hubConfig is what one provisioned handler brings to the hub it shares:
// the hub settings, the round tripper and the logger of its config, and
// that config's lifetime. The hub holds these values, never the handler,
// so that the pooled layer depends on nothing above it.
type hubConfig struct {
	settings hubSettings
	rt       http.RoundTripper
	logger   *zap.Logger
	// done is the config's context's Done channel: it tells handlers of
	// one config apart from those of another.
	done <-chan struct{}
	// server names the HTTP server of the handler, for the status page
	// of that server.
	server string
}

// hub is the shared state of every handler with the same identity: the
// streams by key, and what their upstream requests are made with.
//
// Lock order: hub.mu before stream.mu. A stream's lock is never held while
// taking its hub's.
type hub struct {
	tmpl     *upstreamTemplate
	vary     []string
	headerUp *headers.HeaderOps
	// assignIDs gives events the proxy's own ids (part of the identity).
	assignIDs bool
	// cluster, when set, is the NATS cluster the hub's streams share.
	cluster *clusterHub

	// ctx is the hub's own lifetime, not a config's: it ends when the last
	// config using the hub is gone.
	ctx    context.Context
	cancel context.CancelFunc

	// exit is closed when the process exits: every client ends at once,
	// including those of older configs that are still draining.
	exit     chan struct{}
	exitOnce sync.Once
	// hijacked counts the clients whose sockets the module owns: net/http
	// no longer knows them, so an exiting process waits for their ends.
	hijacked atomic.Int64
	// catchUps counts the catch-up requests of all streams at once.
	catchUps atomic.Int64

	mu      sync.Mutex
	streams map[string]*stream
	// configs are those of the provisioned handlers sharing this hub,
	// oldest first; active is the one in force.
	configs []*hubConfig
	active  *hubConfig
}

func newHub(tmpl *upstreamTemplate, vary []string, headerUp *headers.HeaderOps, first *hubConfig) *hub {
	ctx, cancel := context.WithCancel(context.Background())
	return &hub{
		tmpl:     tmpl,
		vary:     vary,
		headerUp: headerUp,
		ctx:      ctx,
		cancel:   cancel,
		exit:     make(chan struct{}),
		streams:  make(map[string]*stream),
		// the hub is made with its first handler's settings and transport
		active: first,
	}
}

// Destruct ends every stream of the hub; the pool calls it when the last
// config using the hub is cleaned up. The streams' upstreams close at
// once; their clients end in their configs' drain windows.
func (h *hub) Destruct() error {
	h.cancel()
	h.mu.Lock()
	for _, s := range h.streams {
		s.stopLinger()
	}
	metrics.streams.Sub(float64(len(h.streams)))
	clear(h.streams)
	h.mu.Unlock()
	return nil
}

// propose registers a provisioned handler's config. Two handlers of one
// config that share the hub must agree on its settings, since only one set
// can apply.
func (h *hub) propose(c *hubConfig) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, other := range h.configs {
		if other.done == c.done && other.settings != c.settings {
			return h.conflictingSettings(other, c)
		}
	}
	h.configs = append(h.configs, c)
	return nil
}

// conflictingSettings says which setting two handlers of one config that
// share this hub set differently, and what to do.
func (h *hub) conflictingSettings(a, b *hubConfig) error {
	name, va, vb := a.settings.diff(b.settings)
	where := ""
	switch {
	case a.server == "" || b.server == "": // provisioned outside an HTTP server
	case a.server == b.server:
		where = " (in server " + a.server + ")"
	default:
		where = " (in servers " + a.server + " and " + b.server + ")"
	}
	return fmt.Errorf("two sse_fanout handlers for upstream %s%s with the same vary, header_up and transport share their streams, but the first sets %s %v and the second %v: give both the same %s",
		h.tmpl.raw, where, name, va, vb, name)
}

// activate puts a config's settings, transport and logger in force for the
// hub and its existing streams, unless a newer config is in force already
// (an old config may still serve a request while it drains).
func (h *hub) activate(c *hubConfig) {
	h.mu.Lock()
	defer h.mu.Unlock()
	i := slices.Index(h.configs, c)
	if i >= 0 && i >= slices.Index(h.configs, h.active) {
		h.activateLocked(c)
	}
}

func (h *hub) activateLocked(c *hubConfig) {
	h.active = c
	for _, s := range h.streams {
		s.resize(c.settings)
	}
}

// withdraw unregisters the config of a handler that is being cleaned up.
// If it was the active one, the newest remaining config takes over, so that
// new upstream requests never use a transport that was cleaned up. Caddy
// cleans up an old config only after its successor started, and a config
// that failed to load at once, so the newest remaining config is the
// running one.
func (h *hub) withdraw(c *hubConfig) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.configs = slices.DeleteFunc(h.configs, func(o *hubConfig) bool { return o == c })
	if h.active == c && len(h.configs) > 0 {
		h.activateLocked(h.configs[len(h.configs)-1])
	}
}

// current returns the config in force: the settings, round tripper and
// logger that new upstream requests and streams use.
func (h *hub) current() hubConfig {
	h.mu.Lock()
	defer h.mu.Unlock()
	return *h.active
}

// attach finds or creates the stream for key and counts a new client on
// it, returning the stream's position when the client arrived (taken
// before a new stream's upstream can publish anything). It refuses the
// client, naming the limit, when the stream is full or no new stream may
// be created: at max_streams a stream that has no clients (it lingers)
// is closed to make room, so that only streams with clients keep a new
// one out.
func (h *hub) attach(key string, target *url.URL, reqHeader http.Header, last lastID, maxClients int) (s *stream, arrived uint64, limit string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s = h.streams[key]
	if s != nil {
		arrived = s.position()
	} else {
		if h.ctx.Err() != nil {
			return nil, 0, "max_streams"
		}
		evicted, ok := h.roomLocked()
		if !ok {
			return nil, 0, "max_streams"
		}
		initialID := ""
		if last.set && !h.assignIDs { // a proxy id means nothing to the origin
			initialID = last.id
		}
		s = newStream(h, key, target, h.forwardHeader(reqHeader), initialID, h.active.settings)
		if evicted != nil {
			// connect once the closed stream's upstream is gone, so
			// that the origin never sees more than max_streams
			s.after = evicted.done
		}
		h.streams[key] = s
		metrics.streams.Inc()
		if h.cluster != nil {
			s.src = newClusterSource(s, h.cluster)
		} else {
			s.src = newUpstream(s)
		}
		go s.run()
	}
	if maxClients > 0 && s.clients >= maxClients {
		return nil, 0, "max_clients"
	}
	s.clients++
	metrics.clients.Inc()
	s.stopLinger()
	return s, arrived, "" // a new stream's position is 0
}

// roomLocked reports whether one more stream may open, closing the stream
// that has lingered longest when max_streams is reached, and returning it.
func (h *hub) roomLocked() (evicted *stream, ok bool) {
	if max := h.active.settings.maxStreams; max <= 0 || len(h.streams) < max {
		return nil, true
	}
	for _, s := range h.streams {
		if s.clients == 0 && (evicted == nil || s.lingerSince.Before(evicted.lingerSince)) {
			evicted = s
		}
	}
	if evicted == nil {
		return nil, false
	}
	h.closeLocked(evicted)
	return evicted, true
}

// detach uncounts a client. The last client to leave starts the linger
// timer, after which the stream is closed unless a client came back.
func (h *hub) detach(s *stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s.clients--
	metrics.clients.Dec()
	if s.clients > 0 || h.streams[s.key] != s {
		return
	}
	linger := h.active.settings.linger
	if linger <= 0 {
		h.closeLocked(s)
		return
	}
	s.lingerSince = time.Now()
	h.lingerLocked(s, linger)
}

// lingerLocked closes the stream after linger unless a client came back.
// A clustered stream whose upstream this node holds stays open while
// another node has clients for it.
func (h *hub) lingerLocked(s *stream, linger time.Duration) {
	var t *time.Timer
	t = time.AfterFunc(linger, func() {
		if c, ok := s.src.(*clusterSource); ok && c.role.Load() == roleHolder && c.othersInterested() {
			h.mu.Lock()
			defer h.mu.Unlock()
			if s.lingerTimer == t && s.clients == 0 && h.streams[s.key] == s {
				h.lingerLocked(s, linger)
			}
			return
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		// a timer stopped too late (a client came and went meanwhile)
		// is no longer the stream's
		if s.lingerTimer == t && s.clients == 0 && h.streams[s.key] == s {
			h.closeLocked(s)
		}
	})
	s.lingerTimer = t
}

// remove takes a stream that ended by itself out of the map.
func (h *hub) remove(s *stream) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.streams[s.key] == s {
		h.closeLocked(s)
	}
}

func (h *hub) closeLocked(s *stream) {
	delete(h.streams, s.key)
	metrics.streams.Dec()
	s.stopLinger()
	s.cancel()
}

// forwardHeader copies the client's vary headers for the upstream request.
func (h *hub) forwardHeader(reqHeader http.Header) http.Header {
	out := make(http.Header, len(h.vary))
	for _, name := range h.vary {
		if vals, ok := reqHeader[name]; ok {
			out[name] = slices.Clone(vals)
		}
	}
	return out
}

// snapshotStreams returns the hub's streams at this moment.
func (h *hub) snapshotStreams() []*stream {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*stream, 0, len(h.streams))
	for _, s := range h.streams {
		out = append(out, s)
	}
	return out
}

// servedBy says whether a handler of the named server shares the hub.
func (h *hub) servedBy(server string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.ContainsFunc(h.configs, func(c *hubConfig) bool { return c.server == server })
}

// clientCount returns how many clients the stream has.
func (s *stream) clientCount() int {
	s.hub.mu.Lock()
	defer s.hub.mu.Unlock()
	return s.clients
}

// streamCount returns how many streams the hub holds.
func (h *hub) streamCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.streams)
}

// endAll ends every client of the hub at once.
func (h *hub) endAll() {
	h.exitOnce.Do(func() { close(h.exit) })
	h.wakeAll()
}

// wakeAll wakes every client of every stream of the hub, to look at the
// signals they poll (exit, their config stopping).
func (h *hub) wakeAll() {
	h.mu.Lock()
	streams := make([]*stream, 0, len(h.streams))
	for _, s := range h.streams {
		streams = append(streams, s)
	}
	h.mu.Unlock()
	for _, s := range streams {
		s.signal()
	}
}

// waitHijacked waits until the hub's hijacked clients have ended, for at
// most within.
func (h *hub) waitHijacked(within time.Duration) {
	deadline := time.Now().Add(within)
	for h.hijacked.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// exitAllHubs ends every client of every hub: the process is exiting, so
// no config, old or new, should keep a response open.
func exitAllHubs() {
	hubs.Range(func(_, v any) bool {
		v.(*hub).endAll()
		return true
	})
}
