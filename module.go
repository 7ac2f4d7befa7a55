// Package ssefanout is a Caddy HTTP handler that puts one shared upstream
// connection in front of a Server-Sent Events origin and fans its events out
// to every client watching the same stream.
//
// For each distinct upstream stream (the upstream URL plus the values of the
// vary headers) the handler keeps exactly one upstream request open, however
// many clients watch it. It re-parses the upstream event stream as a browser
// would, keeps the recent events in a bounded history and writes each event
// to every client as it arrives. Clients that reconnect with Last-Event-ID
// resume from that history without touching the origin.
package ssefanout

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults for the options; the field comments of Handler repeat them for
// the generated docs.
const (
	defaultHistory      = 1000
	defaultHistoryBytes = 16 << 20
	defaultKeepalive    = 15 * time.Second
	defaultLinger       = 30 * time.Second
	defaultWriteTimeout = 30 * time.Second
	defaultStatusWait   = 5 * time.Second
	defaultMaxEventSize = 1 << 20
	// in a cluster, an event of max_event_size with its id, type and the
	// log's framing fits NATS's default max_payload (1 MiB)
	defaultClusterMaxEventSize = 1<<20 - 2*maxFieldLen - maxLogOverhead
	defaultMaxStreams          = 1000
	defaultDrain               = 5 * time.Second
	defaultMaxCatchUps         = 4
	defaultCatchUpTimeout      = 10 * time.Second
	defaultCatchUpEvents       = 10000
	defaultHeaderTimeout       = 10 * time.Second
	defaultSendBuffer          = 256 << 10
	maxLastEventIDLen          = 1024
	maxRedirects               = 10
	refusalRetryMinMillis      = 5000
	refusalRetrySpread         = 5000
)

// Handler is the sse_fanout HTTP handler. It serves Server-Sent Events
// from a shared upstream connection per stream.
type Handler struct {
	// The upstream base URL, for example `http://127.0.0.1:3000/events`.
	// Its scheme and host are fixed (they may use `{env.*}` placeholders) so
	// that no request can steer the proxy to another host. Its path and query
	// may use request placeholders: one in the path expands to one escaped
	// segment (an empty one is refused with a 400), one in the query to one
	// escaped value, and each expansion is part of the stream key. The
	// request's escaped path is appended to the base path and the request's
	// query to the base query, minus any `lastEventId` parameter and any
	// parameter the base query fixes, so a client can add parameters but
	// never change the fixed ones. Required.
	Upstream string `json:"upstream"`

	// How many dispatched events each stream keeps for clients that resume
	// with Last-Event-ID or ask for replay. Default: 1000. Must be at least 1.
	History int `json:"history,omitempty"`

	// The most bytes of encoded events each stream keeps in its history;
	// the oldest events are dropped first. Default: 16MiB. Must hold one
	// largest event as encoded: an event of max_event_size bytes of data
	// made of empty lines takes up to 6 times that, plus its id and type.
	HistoryBytes int64 `json:"history_bytes,omitempty"`

	// How many of the most recent events a new client without Last-Event-ID
	// gets before the live ones. Default: 0 (live events only). At most
	// history.
	Replay int `json:"replay,omitempty"`

	// How long a client's stream may stay silent before a comment line
	// (`: keepalive`) is written to it, so that intermediaries keep the
	// connection open. Default: 15s. A negative value turns keepalives off.
	Keepalive caddy.Duration `json:"keepalive,omitempty"`

	// How long a stream's upstream connection stays open after its last
	// client left, so that a client that reconnects soon finds it warm.
	// Default: 30s. A negative value closes it at once.
	Linger caddy.Duration `json:"linger,omitempty"`

	// How long one write to a client may stay blocked before the client is
	// disconnected (it resumes by Last-Event-ID when it reconnects). The
	// deadline is moved every quarter of it, so a blocked write is cut
	// after 3/4 to all of it. Default: 30s. The server's `write_idle_timeout` (1m by default) still
	// applies and caps it.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// How long the first clients of a new stream wait for the origin's first
	// answer, so that a 404 or 204 from the origin reaches them as it was
	// sent. After that they get a 200 event stream with keepalives while the
	// upstream keeps trying. Clients of a live or retrying stream never wait.
	// Default: 5s.
	StatusWait caddy.Duration `json:"status_wait,omitempty"`

	// The largest upstream event, in bytes, that is relayed; a larger one is
	// skipped without being buffered (and counted in the logs), and the
	// connection stays up. Default: 1MiB; with a cluster, 1MiB less 9KiB,
	// so that the largest event with its id, type and the log's framing
	// fits NATS's default max_payload.
	MaxEventSize int64 `json:"max_event_size,omitempty"`

	// The most clients one stream may have; past it an EventSource request
	// gets a 200 with a `retry:` of a few seconds and an ended body, other
	// requests a 503 with Retry-After. Default: 0 (no limit).
	MaxClients int `json:"max_clients,omitempty"`

	// The most streams (distinct upstream URLs and vary values) this handler
	// keeps open at once. At the limit, the stream that has lingered
	// longest without clients is closed to make room; when every stream has
	// clients, a request for a new one is refused like a client past
	// max_clients. Default: 1000. A negative value means no limit.
	MaxStreams int `json:"max_streams,omitempty"`

	// The reconnection time sent to clients as `retry:` instead of the
	// origin's. Default: 0, which passes the origin's `retry:` on.
	Retry caddy.Duration `json:"retry,omitempty"`

	// Request headers that are forwarded upstream and that split streams:
	// clients whose values of these headers differ get separate upstream
	// connections. Use it for per-user streams (`Authorization`, `Cookie`);
	// without it no client credential ever reaches the origin.
	Vary []string `json:"vary,omitempty"`

	// Header operations on the upstream request. Values are static or use
	// only `{env.*}`, `{file.*}` and `{system.*}` placeholders, resolved when
	// the config loads: one upstream request serves many clients, so a
	// request placeholder would hand the first client's data to everyone
	// (use vary for per-client headers). Setting `Host` sets the request's
	// host.
	HeaderUp *headers.HeaderOps `json:"header_up,omitempty"`

	// Caddy's reverse_proxy HTTP transport (`http.reverse_proxy.transport.http`)
	// for the upstream connections: TLS, timeouts, HTTP versions. Its
	// response_header_timeout defaults to 10s here, so an origin that
	// accepts and never answers is retried. `proxy_protocol` is not allowed.
	TransportRaw json.RawMessage `json:"transport,omitempty" caddy:"namespace=http.reverse_proxy.transport inline_key=protocol"`

	// How long a stream may stay silent (no event, no comment) before its
	// upstream connection is dropped and resumed with Last-Event-ID.
	// Default: 0 (off).
	UpstreamIdleTimeout caddy.Duration `json:"upstream_idle_timeout,omitempty"`

	// The kernel send buffer of each HTTP/1.1 client connection that
	// carries a stream, in bytes. A small buffer bounds the kernel memory a
	// stuck client holds (Linux grows it to 4MiB) and lets a slow client's
	// lag be noticed while its resume point is still in the history; it
	// still allows about this much per round trip, plenty for events.
	// Default: 256KiB. A negative value leaves the kernel's own sizing.
	ClientSendBuffer int64 `json:"client_send_buffer,omitempty"`

	// When the config is reloaded, the clients' streams are ended spread
	// over this window, so that they reconnect to the new config (and resume
	// from the same history) without all arriving in the same instant. On
	// exit they end at once. Default: 5s.
	Drain caddy.Duration `json:"drain,omitempty"`

	// How many catch-up requests one stream may have open at once. A
	// client of a live stream whose Last-Event-ID the history lacks gets a
	// dedicated upstream request with that id, whose events it receives
	// until they meet the shared stream's (see the README's resume table);
	// clients with the same id share one. Beyond these, at most 32 run per
	// handler and one new one starts per stream per second; a client that
	// finds no slot within 2s starts live, counted as a gap. Default: 4.
	// A negative value (`catch_up off` in the Caddyfile) turns catch-ups
	// off: such a client starts live.
	MaxCatchUps int `json:"max_catch_ups,omitempty"`

	// How long a catch-up's ids may take to meet the shared stream's
	// before its clients continue live, with a gap counted. Default: 10s.
	CatchUpTimeout caddy.Duration `json:"catch_up_timeout,omitempty"`

	// How many events a catch-up may deliver before its ids meet the
	// shared stream's; past them its clients continue live, with a gap
	// counted. Default: 10000.
	CatchUpEvents int `json:"catch_up_events,omitempty"`

	// Give every event the proxy's own id, `<epoch>-<sequence>`, for
	// origins that send none, so that clients can resume from the history.
	// The epoch is new whenever a stream's history starts afresh, so an id
	// from an earlier life is unknown (the client starts live, counted as
	// a gap), never wrong. Proxy ids never go to the origin; ids the origin
	// sends are replaced (a warning is logged once per stream). Part of
	// the handler's identity: changing it starts new streams. Default: off.
	AssignIDs bool `json:"assign_ids,omitempty"`

	// Besides replay, the events of this last stretch of time that a new
	// client without Last-Event-ID gets before the live ones, so that a
	// dashboard opens with recent context whatever the event rate; the
	// client gets whichever of the two reaches further back. Default: 0
	// (off).
	ReplaySince caddy.Duration `json:"replay_since,omitempty"`

	// Share streams with the handlers of other Caddy nodes through NATS
	// JetStream, so that the origin sees one connection per stream across
	// all of them, and clients resume on any node. Everything a stream
	// carries, per-user vary streams included, is stored in NATS. Part of
	// the handler's identity. Default: off (this node alone).
	Cluster *ClusterConfig `json:"cluster,omitempty"`

	transport *reverseproxy.HTTPTransport
	// transportJSON is the transport's config, part of the hub identity.
	transportJSON json.RawMessage
	server        *caddyhttp.Server
	hub           *hub
	hubKey        string
	hubRef        bool
	// hubCfg is what this handler brings to its hub.
	hubCfg *hubConfig
	// natsLink is the cluster's NATS connection, pooled under natsKey.
	natsLink *natsLink
	natsKey  string
	logger   *zap.Logger
	// stopping is closed when this config's server begins to shut down.
	stopping chan struct{}
	state    *handlerState
}

// handlerState is the part of a provisioned handler that must not be
// copied.
type handlerState struct {
	activated atomic.Bool
	stopOnce  sync.Once
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_fanout",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults, resolves the static parts of the upstream
// request, provisions the transport and takes a reference to the shared hub.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	h.stopping = make(chan struct{})
	h.state = new(handlerState)
	h.setDefaults()

	if err := h.Validate(); err != nil {
		return err
	}
	tmpl, err := parseUpstream(h.Upstream)
	if err != nil {
		return err
	}
	for i, name := range h.Vary {
		h.Vary[i] = http.CanonicalHeaderKey(name)
	}
	if err := h.provisionHeaderUp(ctx); err != nil {
		return err
	}
	if err := h.provisionTransport(ctx); err != nil {
		return fmt.Errorf("provisioning transport: %v", err)
	}

	h.hubCfg = &hubConfig{
		settings: hubSettings{
			history:      h.History,
			historyBytes: h.HistoryBytes,
			maxEventSize: h.MaxEventSize,
			linger:       time.Duration(h.Linger),
			maxStreams:   h.MaxStreams,
			idleTimeout:  time.Duration(h.UpstreamIdleTimeout),
		},
		rt:     h.transport,
		logger: h.logger,
		done:   ctx.Done(),
	}
	srv, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if srv != nil {
		h.hubCfg.server = srv.Name()
	}
	if h.Cluster != nil {
		if err := h.provisionCluster(); err != nil {
			return err
		}
	}
	h.hubKey, err = h.identity()
	if err != nil {
		return err
	}
	val, _, err := hubs.LoadOrNew(h.hubKey, func() (caddy.Destructor, error) {
		hb := newHub(tmpl, h.Vary, h.HeaderUp, h.hubCfg)
		hb.assignIDs = h.AssignIDs
		if h.natsLink != nil {
			hb.cluster = newClusterHub(*h.Cluster.NATS, h.natsLink, h.logger, h.MaxEventSize)
			go hb.cluster.run(hb.ctx, h.History)
		}
		return hb, nil
	})
	if err != nil {
		return fmt.Errorf("loading shared state: %v", err)
	}
	h.hubRef = true
	h.hub = val.(*hub)
	if err := h.hub.propose(h.hubCfg); err != nil {
		return err
	}

	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	if srv != nil {
		srv.RegisterOnShutdown(h.shutdown)
		rememberConns(srv)
		h.server = srv
	}
	return nil
}

// withDefaults returns a copy of the options with defaults filled in.
func (h Handler) withDefaults() Handler {
	h.setDefaults()
	return h
}

// setDefaults fills in every option left at its zero value.
func (h *Handler) setDefaults() {
	setDefault(&h.History, defaultHistory)
	setDefault(&h.HistoryBytes, defaultHistoryBytes)
	setDefault(&h.Keepalive, caddy.Duration(defaultKeepalive))
	setDefault(&h.Linger, caddy.Duration(defaultLinger))
	setDefault(&h.WriteTimeout, caddy.Duration(defaultWriteTimeout))
	setDefault(&h.StatusWait, caddy.Duration(defaultStatusWait))
	if h.Cluster != nil {
		setDefault(&h.MaxEventSize, defaultClusterMaxEventSize)
	}
	setDefault(&h.MaxEventSize, defaultMaxEventSize)
	setDefault(&h.MaxStreams, defaultMaxStreams)
	setDefault(&h.Drain, caddy.Duration(defaultDrain))
	setDefault(&h.ClientSendBuffer, defaultSendBuffer)
	setDefault(&h.MaxCatchUps, defaultMaxCatchUps)
	setDefault(&h.CatchUpTimeout, caddy.Duration(defaultCatchUpTimeout))
	setDefault(&h.CatchUpEvents, defaultCatchUpEvents)
}

// setDefault sets *v to def when it is zero, which means "not set".
func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// Validate checks the options after their defaults are set.
func (h *Handler) Validate() error {
	switch {
	case h.Upstream == "":
		return badOption("upstream: an upstream base URL is required, e.g. http://127.0.0.1:3000", "upstream")
	case h.History < 1:
		return badOption(fmt.Sprintf("history: must be at least 1, got %d", h.History), "history")
	case h.MaxEventSize < 1:
		return badOption(fmt.Sprintf("max_event_size: must be positive, got %d", h.MaxEventSize), "max_event_size")
	case h.HistoryBytes < maxEncodedEvent(h.MaxEventSize):
		return badOption(fmt.Sprintf("history_bytes (%d) must hold one largest event: %d bytes for max_event_size %d, as an event of that many line ends is encoded as one `data:` line each, with an id, a type and its framing; raise history_bytes or lower max_event_size", h.HistoryBytes, maxEncodedEvent(h.MaxEventSize), h.MaxEventSize), "history_bytes", "max_event_size")
	case h.Replay < 0 || h.Replay > h.History:
		return badOption(fmt.Sprintf("replay: must be between 0 and history (%d), got %d", h.History, h.Replay), "replay", "history")
	case h.MaxClients < 0:
		return badOption(fmt.Sprintf("max_clients: must not be negative (0 means no limit), got %d", h.MaxClients), "max_clients")
	case h.WriteTimeout < 0:
		return badOption("write_timeout: must not be negative", "write_timeout")
	case h.StatusWait < 0:
		return badOption("status_wait: must not be negative", "status_wait")
	case h.Retry < 0:
		return badOption("retry: must not be negative", "retry")
	case h.UpstreamIdleTimeout < 0:
		return badOption("upstream_idle_timeout: must not be negative", "upstream_idle_timeout")
	case h.Drain < 0:
		return badOption("drain: must not be negative", "drain")
	case h.CatchUpTimeout < 0:
		return badOption("catch_up_timeout: must not be negative", "catch_up_timeout")
	case h.CatchUpEvents < 0:
		return badOption("catch_up_events: must not be negative", "catch_up_events")
	case h.ReplaySince < 0:
		return badOption("replay_since: must not be negative", "replay_since")
	}
	for _, name := range h.Vary {
		if err := checkVaryName(name); err != nil {
			return badOption(err.Error(), "vary")
		}
	}
	if ops := h.HeaderUp; ops != nil {
		if len(ops.Replace) > 0 {
			return badOption("header_up: replace operations are not supported; the upstream request carries no client header to edit (use vary to forward one)", "header_up")
		}
		for _, hdr := range []http.Header{ops.Set, ops.Add} {
			for name, vals := range hdr {
				for _, v := range vals {
					if err := checkHeaderUp(name, v); err != nil {
						return badOption(err.Error(), "header_up")
					}
				}
			}
		}
		for _, name := range ops.Delete {
			if err := checkHeaderUp(name, ""); err != nil {
				return badOption(err.Error(), "header_up")
			}
		}
	}
	if h.TransportRaw != nil {
		if err := checkTransport(h.TransportRaw); err != nil {
			return badOption(err.Error(), "transport")
		}
	}
	if c := h.Cluster; c != nil {
		if c.NATS == nil {
			return badOption("cluster: the only engine is nats ('cluster nats <url...>')", "cluster")
		}
		n := *c.NATS
		n.setDefaults()
		if err := n.validate(); err != nil {
			return badOption(err.Error(), "cluster")
		}
	}
	return nil
}

// optionError is a bad option value. options names the options involved,
// the one to change first, so that the Caddyfile reports its line.
type optionError struct {
	options []string
	msg     string
}

func (e *optionError) Error() string { return e.msg }

func badOption(msg string, options ...string) error {
	return &optionError{options: options, msg: msg}
}

// checkHeaderUp refuses request placeholders in a header_up field: one
// upstream request serves many clients, so the first client's value would
// go to everyone.
func checkHeaderUp(name, value string) error {
	if p := requestPlaceholder(name); p != "" {
		return fmt.Errorf("header_up %s: placeholders are not allowed in field names", name)
	}
	if p := requestPlaceholder(value); p != "" {
		return fmt.Errorf("header_up %s: placeholder %s depends on the request, but one upstream request serves many clients; forward the client's header with 'vary %s' instead (only {env.*}, {file.*} and {system.*} are allowed here)", name, p, name)
	}
	return nil
}

// checkVaryName refuses what cannot be a vary header: not a field name,
// or a field the proxy sets itself or that never reaches the origin as a
// client sent it.
func checkVaryName(name string) error {
	if name == "" || strings.ContainsAny(name, "{}: ") {
		return fmt.Errorf("vary: %q is not a header name", name)
	}
	switch http.CanonicalHeaderKey(name) {
	case "Host":
		return fmt.Errorf("vary: Host does not reach the origin (the upstream's host comes from its URL); to set the upstream request's Host, use 'header_up Host <value>'")
	case "Last-Event-Id":
		return fmt.Errorf("vary: Last-Event-ID is the client's resume point, which the proxy answers from the history and sends upstream itself; it cannot split streams")
	case "Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return fmt.Errorf("vary: %s is a hop-by-hop header and never reaches the origin", name)
	}
	return nil
}

// checkTransport accepts only Caddy's http transport, without
// proxy_protocol: a shared upstream connection carries no single client's
// address.
func checkTransport(raw json.RawMessage) error {
	var probe struct {
		Protocol      string `json:"protocol"`
		ProxyProtocol string `json:"proxy_protocol"`
	}
	if err := json.Unmarshal(raw, &probe); err != nil {
		return fmt.Errorf("transport: %v", err)
	}
	if probe.Protocol != "http" {
		return fmt.Errorf("transport: only the \"http\" protocol is supported, got %q", probe.Protocol)
	}
	if probe.ProxyProtocol != "" {
		return errors.New("transport: proxy_protocol is not supported: a shared upstream connection carries no single client's address")
	}
	return nil
}

// provisionCluster fills in the cluster's defaults and takes a reference
// to the NATS connection it names, shared with every handler that names
// the same servers, credentials and TLS, and kept across reloads. NATS
// being unreachable is not an error: the connection keeps trying, and the
// streams fall back to their own upstreams meanwhile.
func (h *Handler) provisionCluster() error {
	n := h.Cluster.NATS
	n.setDefaults()
	h.natsKey = n.linkKey()
	val, _, err := natsLinks.LoadOrNew(h.natsKey, func() (caddy.Destructor, error) {
		return dialNATS(n, h.logger)
	})
	if err != nil {
		return fmt.Errorf("cluster: %v", err)
	}
	h.natsLink = val.(*natsLink)
	return nil
}

// provisionHeaderUp resolves header_up's values once, for every upstream
// request of the hub.
func (h *Handler) provisionHeaderUp(ctx caddy.Context) error {
	if h.HeaderUp == nil {
		return nil
	}
	// Validate has refused request placeholders
	repl := caddy.NewReplacer()
	for _, hdr := range []http.Header{h.HeaderUp.Set, h.HeaderUp.Add} {
		for _, vals := range hdr {
			for i, v := range vals {
				vals[i] = repl.ReplaceAll(v, "")
			}
		}
	}
	return h.HeaderUp.Provision(ctx)
}

// provisionTransport loads Caddy's HTTP transport (the reverse_proxy one),
// with this module's defaults.
func (h *Handler) provisionTransport(ctx caddy.Context) error {
	if h.TransportRaw == nil {
		h.TransportRaw = json.RawMessage(`{"protocol":"http"}`)
	}
	var probe reverseproxy.HTTPTransport
	if err := json.Unmarshal(h.TransportRaw, &probe); err != nil {
		return err
	}
	if probe.ResponseHeaderTimeout == 0 {
		var fields map[string]json.RawMessage
		if err := json.Unmarshal(h.TransportRaw, &fields); err != nil {
			return err
		}
		fields["response_header_timeout"] = json.RawMessage(strconv.FormatInt(int64(defaultHeaderTimeout), 10))
		raw, err := json.Marshal(fields)
		if err != nil {
			return err
		}
		h.TransportRaw = raw
	}
	// LoadModule clears the raw field once loaded; the identity needs it
	h.transportJSON = slices.Clone(h.TransportRaw)
	mod, err := ctx.LoadModule(h, "TransportRaw")
	if err != nil {
		return err
	}
	rt, ok := mod.(*reverseproxy.HTTPTransport)
	if !ok {
		return fmt.Errorf("transport %T is not supported; use 'transport http'", mod)
	}
	h.transport = rt
	return nil
}

// identity is the key under which handlers share a hub across reloads: the
// things that decide which upstream requests it makes.
func (h *Handler) identity() (string, error) {
	b, err := json.Marshal(struct {
		Upstream  string             `json:"u"`
		Vary      []string           `json:"v"`
		HeaderUp  *headers.HeaderOps `json:"h"`
		Transport json.RawMessage    `json:"t"`
		AssignIDs bool               `json:"a"`
		Cluster   *ClusterConfig     `json:"c"`
	}{h.Upstream, h.Vary, h.HeaderUp, h.transportJSON, h.AssignIDs, h.Cluster})
	if err != nil {
		return "", fmt.Errorf("computing handler identity: %v", err)
	}
	return string(b), nil
}

// Cleanup releases the hub reference taken by Provision (only if it was
// taken) and lets this config's clients drain. When the process exits, it
// waits (at most a second) for the clients whose sockets the module took
// over to end cleanly: net/http neither waits for nor closes those.
func (h *Handler) Cleanup() error {
	if h.state != nil {
		h.shutdown()
	}
	if h.hub != nil && caddy.Exiting() {
		h.hub.waitHijacked(time.Second)
	}
	if h.server != nil {
		forgetConns(h.server)
	}
	if h.hub != nil {
		h.hub.withdraw(h.hubCfg)
	}
	if h.hubRef {
		h.hubRef = false
		if _, err := hubs.Delete(h.hubKey); err != nil {
			return fmt.Errorf("releasing shared state: %v", err)
		}
	}
	if h.natsLink != nil {
		h.natsLink = nil
		if _, err := natsLinks.Delete(h.natsKey); err != nil {
			return fmt.Errorf("releasing the NATS connection: %v", err)
		}
	}
	return nil
}

// shutdown is called when this config's server starts to shut down: the
// clients of this handler end, spread over the drain window, or at once
// when the process exits.
func (h *Handler) shutdown() {
	h.state.stopOnce.Do(func() { close(h.stopping) })
	if h.hub == nil {
		return
	}
	if caddy.Exiting() {
		exitAllHubs()
		return
	}
	h.hub.wakeAll()
}

// drainDelay is how long a client of a stopping handler waits before its
// stream ends: a random point in the drain window, so that thousands of
// EventSources don't reconnect in the same instant.
func (h *Handler) drainDelay() time.Duration {
	if caddy.Exiting() || h.Drain <= 0 {
		return 0
	}
	return rand.N(time.Duration(h.Drain))
}

// ServeHTTP serves GET requests from the shared stream, answers HEAD with
// the stream headers, and passes every other method to the next handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return next.ServeHTTP(w, r)
	}
	if closed(h.stopping) {
		// this config is going away: end at once, EventSource retries
		// and reaches the new one
		writeRefusal(w, r, 0)
		return nil
	}
	if !h.state.activated.Load() {
		h.activate()
	}

	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	target, expansions, err := h.hub.tmpl.build(r, repl)
	if err != nil {
		h.refuseBadRequest(w, err)
		return nil
	}
	if r.Method == http.MethodHead {
		setStreamHeaders(w.Header())
		w.WriteHeader(http.StatusOK)
		return nil
	}
	key := streamKey(target.String(), expansions, h.Vary, r.Header)
	last := clientLastID(r)

	s, arrived, limit := h.hub.attach(key, target, r.Header, last, h.MaxClients)
	if limit != "" {
		metrics.refused.WithLabelValues(limit).Inc()
		if ce := h.logger.Check(zapcore.DebugLevel, "request refused: a limit is reached"); ce != nil {
			ce.Write(zap.String("limit", limit), zap.String("stream", keyHash(key)))
		}
		writeRefusal(w, r, refusalRetryMinMillis+rand.N(refusalRetrySpread))
		return nil
	}
	if h.ClientSendBuffer > 0 {
		setSendBuffer(r.Context(), int(h.ClientSendBuffer))
	}
	if !h.serveClient(w, r, s, arrived, last) {
		h.hub.detach(s) // a hijacked client detaches when it ends
	}
	return nil
}

// refuseBadRequest answers a request that maps to no valid upstream URL
// with a 400 and one line saying why, and logs the detail at debug level
// (never the path or values themselves, which may be a tenant's).
func (h *Handler) refuseBadRequest(w http.ResponseWriter, err error) {
	public := "bad request"
	var br *badRequest
	if errors.As(err, &br) {
		public = br.public
	}
	if ce := h.logger.Check(zapcore.DebugLevel, "request refused: it maps to no valid upstream URL"); ce != nil {
		ce.Write(zap.Error(err))
	}
	http.Error(w, public, http.StatusBadRequest)
}

// activate makes this config's hub settings, transport and logger the
// hub's, once the config serves its first request: a config that fails to
// load must change nothing in the shared state.
func (h *Handler) activate() {
	if h.state.activated.Swap(true) {
		return
	}
	h.hub.activate(h.hubCfg)
}

// setStreamHeaders sets the headers of every event-stream response.
// no-transform keeps Caddy's encode and other intermediaries from buffering
// or compressing the stream; X-Accel-Buffering does the same for nginx.
func setStreamHeaders(hdr http.Header) {
	hdr.Set("Content-Type", "text/event-stream")
	hdr.Set("Cache-Control", "no-cache, no-transform")
	hdr.Set("X-Accel-Buffering", "no")
}

// writeRefusal turns a client away in a way EventSource handles well: a
// 200 with a retry: and an ended body, so it tries again later instead of
// failing for good as it would on a 503. Other clients get the 503.
func writeRefusal(w http.ResponseWriter, r *http.Request, retryMillis int) {
	if !acceptsEventStream(r) && retryMillis > 0 {
		w.Header().Set("Retry-After", strconv.Itoa((retryMillis+999)/1000))
		http.Error(w, "too many streams or clients, try again later", http.StatusServiceUnavailable)
		return
	}
	setStreamHeaders(w.Header())
	w.WriteHeader(http.StatusOK)
	if retryMillis > 0 {
		_, _ = w.Write(appendRetry(nil, int64(retryMillis)))
	}
}

// acceptsEventStream reports whether the request is an EventSource's.
func acceptsEventStream(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		if strings.Contains(strings.ToLower(v), "text/event-stream") {
			return true
		}
	}
	return false
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
