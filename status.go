package ssefanout

import (
	"cmp"
	"context"
	_ "embed"
	"encoding/json"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(new(StatusPage))
	// the directive is registered with sse_fanout's, in caddyfile.go, so
	// that its order comes first
}

// statusHTML is the page: self-contained (no external assets), it reads
// the reports from its own URL with EventSource.
//
//go:embed status.html
var statusHTML []byte

// StatusPage serves a live status page of the sse_fanout streams of its
// own HTTP server: one self-contained HTML page that updates itself over
// its own event stream, the same reports as JSON for scripts
// (`Accept: application/json` or `?format=json`), and the stream itself
// (`Accept: text/event-stream`, as EventSource sends). Streams are named
// by a hash of their key and their configured upstream template, never by
// expanded paths, queries or vary values, which can hold another tenant's
// credentials.
//
// It answers loopback clients only, unless allow_remote is set: put it
// behind basic_auth (or forward_auth) then.
type StatusPage struct {
	// AllowRemote lets clients from other addresses than loopback see the
	// page. Without it, only requests from this host are answered (see
	// fromLoopback); others get 403. Default: off.
	AllowRemote bool `json:"allow_remote,omitempty"`

	sampler  *sampler
	server   string
	stopping chan struct{}
	stopOnce sync.Once
}

// CaddyModule returns the Caddy module information.
func (*StatusPage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_fanout_status",
		New: func() caddy.Module { return new(StatusPage) },
	}
}

// Provision finds (or starts) the sampler of the page's server, and ends
// the page's streams when the server shuts down: on a reload the page
// reconnects to the new config; Caddy's default grace period would
// otherwise wait for them forever.
func (p *StatusPage) Provision(ctx caddy.Context) error {
	p.stopping = make(chan struct{})
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv != nil {
		p.server = srv.Name()
		srv.RegisterOnShutdown(p.stop)
	}
	val, _, err := samplers.LoadOrNew(p.server, func() (caddy.Destructor, error) {
		return startSampler(p.server), nil
	})
	if err != nil {
		return err
	}
	p.sampler = val.(*sampler)
	return nil
}

// Cleanup ends the page's streams and releases the sampler; the last page
// of a server stops it.
func (p *StatusPage) Cleanup() error {
	p.stop()
	if p.sampler != nil {
		p.sampler = nil
		if _, err := samplers.Delete(p.server); err != nil {
			return err
		}
	}
	return nil
}

func (p *StatusPage) stop() { p.stopOnce.Do(func() { close(p.stopping) }) }

// maxStatusViewers bounds the page's open event streams per server: each
// costs a goroutine and a write per second.
const maxStatusViewers = 64

// ServeHTTP answers with the page, the reports' stream or the latest
// report as JSON. It never calls next.
func (p *StatusPage) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if !p.AllowRemote {
		if !fromLoopback(r) {
			return caddyhttp.Error(http.StatusForbidden, errStatusRemote)
		}
		if !namesThisHost(r) {
			return caddyhttp.Error(http.StatusForbidden, errStatusHost)
		}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
	}
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Add("Vary", "Accept")
	switch accept := r.Header.Get("Accept"); {
	case r.URL.Query().Get("format") == "json" || strings.HasPrefix(accept, "application/json"):
		full, _ := p.sampler.latest()
		h.Set("Content-Type", "application/json")
		_, err := w.Write(full)
		return err
	case strings.HasPrefix(accept, "text/event-stream"):
		return p.serveStream(w, r)
	}
	h.Set("Content-Type", "text/html; charset=utf-8")
	// the page has no external assets: it needs nothing but itself
	h.Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
	_, err := w.Write(statusHTML)
	return err
}

var errStatusRemote = errorString("sse_fanout_status answers loopback clients only; set allow_remote (behind basic_auth) to show it to others")

var errStatusHost = errorString("sse_fanout_status answers loopback clients that name this host (localhost or a loopback address, or the site's name over HTTPS); set allow_remote (behind basic_auth) to answer other names")

// namesThisHost says whether the request's Host names this host: localhost,
// a name under .localhost, or a loopback address; over TLS, any name, as
// the site holds a certificate for it. A loopback-only page checks it
// against DNS rebinding: a page of another site whose name is made to
// resolve to 127.0.0.1 would otherwise read it from the visitor's own
// browser, which connects from loopback (Caddy's admin API checks Host
// for the same reason).
func namesThisHost(r *http.Request) bool {
	if r.TLS != nil {
		return true
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if inner, ok := strings.CutPrefix(host, "["); ok {
		if host, ok = strings.CutSuffix(inner, "]"); !ok {
			return false
		}
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

type errorString string

func (e errorString) Error() string { return string(e) }

// fromLoopback says whether the request comes from this host: its peer
// is a loopback address (or a unix socket), its client address as Caddy
// determined it (trusted_proxies apply) is a loopback one, and, when it
// came through a trusted proxy, so is every address in the server's
// client IP headers. Caddy's client address alone is not enough: without
// trusted_proxies_strict it is the left-most address of the header, which
// the client writes; with it, a client in a trusted range is reported as
// the proxy; and a remote proxy's loopback is not this host's.
func fromLoopback(r *http.Request) bool {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	switch {
	case err == nil && !peer.Addr().Unmap().IsLoopback():
		return false
	case err != nil && r.RemoteAddr != "@": // "@": a unix socket
		return false
	}
	addr, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	if addr == "" {
		return err == nil
	}
	if ip, err := netip.ParseAddr(addr); err != nil || !ip.Unmap().IsLoopback() {
		return false
	}
	if trusted, _ := caddyhttp.GetVar(r.Context(), caddyhttp.TrustedProxyVarKey).(bool); !trusted {
		return true
	}
	headers := []string{"X-Forwarded-For"}
	if srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv != nil && len(srv.ClientIPHeaders) > 0 {
		headers = srv.ClientIPHeaders
	}
	for _, name := range headers {
		for _, v := range r.Header.Values(name) {
			for part := range strings.SplitSeq(v, ",") {
				if part = strings.TrimSpace(part); part == "" {
					continue
				}
				if host, _, err := net.SplitHostPort(part); err == nil {
					part = host
				}
				part, _, _ = strings.Cut(part, "%")
				if ip, err := netip.ParseAddr(part); err != nil || !ip.Unmap().IsLoopback() {
					return false
				}
			}
		}
	}
	return true
}

// serveStream sends the latest report whole, then each new one without
// the sparkline history (the page adds each report's point to its own),
// until the client goes or the server shuts down (a reload or the
// process's exit).
func (p *StatusPage) serveStream(w http.ResponseWriter, r *http.Request) error {
	sm := p.sampler
	if sm.viewers.Add(1) > maxStatusViewers {
		sm.viewers.Add(-1)
		w.Header().Set("Retry-After", "10")
		return caddyhttp.Error(http.StatusServiceUnavailable, errorString("too many status page viewers"))
	}
	defer sm.viewers.Add(-1)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache, no-transform")
	h.Del("Vary")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil // the head alone: a HEAD's stream would never end
	}
	rc := http.NewResponseController(w)
	write := func(parts ...[]byte) bool {
		_ = rc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		for _, b := range parts {
			if _, err := w.Write(b); err != nil {
				return false
			}
		}
		return rc.Flush() == nil
	}
	full, next := sm.latest()
	if !write([]byte("retry: 2000\n"), []byte("data: "), full, []byte("\n\n")) {
		return nil
	}
	for {
		select {
		case <-next:
		case <-r.Context().Done():
			return nil
		case <-p.stopping:
			return nil
		}
		var delta []byte
		delta, next = sm.latestDelta()
		if !write([]byte("data: "), delta, []byte("\n\n")) {
			return nil
		}
	}
}

// samplers holds one sampler per HTTP server name, shared by the status
// pages of that server and kept across reloads, so that the sparkline
// does not start over.
var samplers = caddy.NewUsagePool()

// sampleEvery is the period of the status reports; sparkPoints of them
// make the sparkline (five minutes).
const (
	sampleEvery = time.Second
	sparkPoints = 300
)

// statusStreamsShown bounds the streams a report lists (those with the
// most clients); the totals count all of them.
const statusStreamsShown = 100

// sampler makes a report of a server's streams every sampleEvery: rates
// from the streams' counters, the sparkline, and the report's JSON, made
// once for every viewer.
type sampler struct {
	server  string
	cancel  context.CancelFunc
	viewers atomic.Int64

	mu    sync.Mutex
	full  []byte        // the latest report
	delta []byte        // the same without the sparkline history
	ready chan struct{} // closed when the next report is made

	// owned by the sampling goroutine
	prev   map[*stream]streamCounts
	prevAt time.Time
	spark  []sparkPoint
}

type streamCounts struct{ events, deliveries uint64 }

// statusReport is what the page shows: the totals of the server's streams,
// the sparkline and the busiest streams.
type statusReport struct {
	Server        string  `json:"server"`
	Node          string  `json:"node,omitempty"` // the cluster node name, for clustered handlers
	Time          int64   `json:"time"`           // Unix ms
	Streams       int     `json:"streams"`
	Clients       int     `json:"clients"`
	UpstreamsOpen int     `json:"upstreams_open"`
	EventsPerSec  float64 `json:"events_per_sec"`
	DeliveriesSec float64 `json:"deliveries_per_sec"`
	// FanoutRatio is clients per open upstream connection; null while
	// none is open.
	FanoutRatio *float64       `json:"fanout_ratio"`
	Shown       []statusStream `json:"stream_list"`
	History     []sparkPoint   `json:"history,omitempty"`
	Point       sparkPoint     `json:"point"`
}

// statusStream is one stream in a report.
type statusStream struct {
	Upstream string `json:"upstream"` // the configured template
	Cluster  string `json:"cluster,omitempty"`
	streamStatus
	EventsPerSec  float64  `json:"events_per_sec"`
	DeliveriesSec float64  `json:"deliveries_per_sec"`
	FanoutRatio   *float64 `json:"fanout_ratio"`
}

// sparkPoint is one point of the sparkline.
type sparkPoint struct {
	Time          int64   `json:"t"` // Unix ms
	Clients       int     `json:"clients"`
	EventsPerSec  float64 `json:"events_per_sec"`
	DeliveriesSec float64 `json:"deliveries_per_sec"`
}

func startSampler(server string) *sampler {
	ctx, cancel := context.WithCancel(context.Background())
	sm := &sampler{server: server, cancel: cancel, ready: make(chan struct{}), prev: map[*stream]streamCounts{}}
	sm.sample(time.Now())
	go sm.run(ctx)
	return sm
}

// Destruct stops the sampler; the pool calls it when the last status page
// of its server is cleaned up.
func (sm *sampler) Destruct() error {
	sm.cancel()
	return nil
}

func (sm *sampler) run(ctx context.Context) {
	t := time.NewTicker(sampleEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			sm.sample(now)
		}
	}
}

// latest returns the latest whole report and a channel closed when the
// next one is made.
func (sm *sampler) latest() ([]byte, <-chan struct{}) {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	return sm.full, sm.ready
}

// latestDelta returns the latest report without its sparkline history and
// a channel closed when the next one is made.
func (sm *sampler) latestDelta() ([]byte, <-chan struct{}) {
	sm.mu.Lock()
	defer sm.mu.Unlock()
	return sm.delta, sm.ready
}

// sample makes the report of this moment.
func (sm *sampler) sample(now time.Time) {
	type row struct {
		h       *hub
		s       *stream
		clients int
		rate    [2]float64
		open    bool
	}
	var rows []row
	rep := statusReport{Server: sm.server, Time: now.UnixMilli()}
	dt := now.Sub(sm.prevAt).Seconds()
	seen := make(map[*stream]streamCounts, len(sm.prev))
	hubs.Range(func(_, v any) bool {
		h := v.(*hub)
		if !h.servedBy(sm.server) {
			return true
		}
		if h.cluster != nil {
			rep.Node = nodeID
		}
		h.mu.Lock()
		for _, s := range h.streams {
			rows = append(rows, row{h: h, s: s, clients: s.clients})
		}
		h.mu.Unlock()
		return true
	})
	for i := range rows {
		r := &rows[i]
		c := streamCounts{r.s.stats.events.Load(), r.s.stats.deliveries.Load()}
		seen[r.s] = c
		if p, ok := sm.prev[r.s]; ok && dt > 0 {
			r.rate = [2]float64{float64(c.events-p.events) / dt, float64(c.deliveries-p.deliveries) / dt}
		}
		r.open = r.s.upstreamOpenHere()
		rep.Streams++
		rep.Clients += r.clients
		rep.EventsPerSec += r.rate[0]
		rep.DeliveriesSec += r.rate[1]
		if r.open {
			rep.UpstreamsOpen++
		}
	}
	sm.prev, sm.prevAt = seen, now
	if rep.UpstreamsOpen > 0 {
		clients := 0
		for _, r := range rows {
			if r.open {
				clients += r.clients
			}
		}
		rep.FanoutRatio = ratio(clients, rep.UpstreamsOpen)
	}
	slices.SortFunc(rows, func(a, b row) int {
		return cmp.Or(cmp.Compare(b.clients, a.clients), strings.Compare(a.s.name, b.s.name))
	})
	rep.Shown = make([]statusStream, 0, min(len(rows), statusStreamsShown))
	for _, r := range rows[:min(len(rows), statusStreamsShown)] {
		ss := statusStream{
			Upstream:      r.h.tmpl.raw,
			streamStatus:  r.s.status(r.clients, r.h.current().settings),
			EventsPerSec:  r.rate[0],
			DeliveriesSec: r.rate[1],
		}
		if r.open {
			ss.FanoutRatio = ratio(r.clients, 1)
		}
		if c := r.h.cluster; c != nil {
			ss.Cluster = c.cfg.Name
		}
		rep.Shown = append(rep.Shown, ss)
	}
	rep.Point = sparkPoint{Time: rep.Time, Clients: rep.Clients, EventsPerSec: rep.EventsPerSec, DeliveriesSec: rep.DeliveriesSec}
	if len(sm.spark) == sparkPoints {
		sm.spark = slices.Delete(sm.spark, 0, 1)
	}
	sm.spark = append(sm.spark, rep.Point)
	delta, _ := json.Marshal(rep)
	rep.History = sm.spark
	full, _ := json.Marshal(rep)

	sm.mu.Lock()
	sm.full, sm.delta = full, delta
	close(sm.ready)
	sm.ready = make(chan struct{})
	sm.mu.Unlock()
}

func ratio(a, b int) *float64 {
	r := float64(a) / float64(b)
	return &r
}

// parseStatusCaddyfile builds a StatusPage from a sse_fanout_status
// directive.
func parseStatusCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	p := new(StatusPage)
	err := p.UnmarshalCaddyfile(h.Dispenser)
	return p, err
}

// UnmarshalCaddyfile sets up the page from Caddyfile tokens. Syntax:
//
//	sse_fanout_status [<matcher>] {
//	    allow_remote
//	}
func (p *StatusPage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("sse_fanout_status: unexpected argument %q; the only option, allow_remote, goes in a block", d.Val())
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "allow_remote":
			if p.AllowRemote {
				return d.Errf("allow_remote: specified more than once")
			}
			if d.NextArg() {
				return d.Errf("allow_remote takes no value, got %q", d.Val())
			}
			p.AllowRemote = true
		default:
			return d.Errf("unrecognized option %q; sse_fanout_status takes allow_remote", d.Val())
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*StatusPage)(nil)
	_ caddy.CleanerUpper          = (*StatusPage)(nil)
	_ caddyhttp.MiddlewareHandler = (*StatusPage)(nil)
	_ caddyfile.Unmarshaler       = (*StatusPage)(nil)
)
