// Package demoorigin is a small Server-Sent Events origin for the
// caddy-sse-fanout demo: the Caddy module http.handlers.sse_demo_origin,
// Caddyfile directive sse_demo_origin. Only cmd/caddy plugs it in.
//
// On every path it streams a made-up price ticker as text/event-stream,
// one event per interval, with ids 1, 2, 3... It logs every connection it
// opens and closes with the number still open, so that whoever runs the demo
// sees the origin hold one connection however many clients watch through
// sse_fanout.
//
// Event n of a path is computed from the clock (it is due at the process
// start plus n-1 intervals) and from the path, so every connection of a path
// sees the same sequence, a client resumes by Last-Event-ID without the
// origin storing anything, and no generator goroutine is needed.
package demoorigin

import (
	"fmt"
	"hash/fnv"
	"math"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(new(Origin))
	httpcaddyfile.RegisterHandlerDirective("sse_demo_origin", parseCaddyfile)
	// The origin answers every request it gets, like respond.
	httpcaddyfile.RegisterDirectiveOrder("sse_demo_origin", httpcaddyfile.Before, "respond")
}

// processStart is the time event 1 of every stream is due. It is per
// process, not per config, so ids keep counting across config reloads.
var processStart = time.Now()

// Origin is an HTTP handler that streams a demo ticker as Server-Sent Events
// on every path. It never calls the next handler.
type Origin struct {
	// Interval is the time between two events of a stream. Default: 1s.
	// Changing it renumbers the events of a running process.
	Interval caddy.Duration `json:"interval,omitempty"`

	// Backlog is the largest number of missed events sent to a client
	// that reconnects with a Last-Event-ID; older ones are skipped.
	// Default: 100.
	Backlog int `json:"backlog,omitempty"`

	epoch    time.Time     // when event 1 is due
	logger   *zap.Logger   // the module's logger
	open     atomic.Int64  // responses being streamed now
	done     chan struct{} // closed on server shutdown or Cleanup: ends every response
	stopOnce sync.Once     // closes done once
}

// CaddyModule returns the Caddy module information.
func (*Origin) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse_demo_origin",
		New: func() caddy.Module { return new(Origin) },
	}
}

// Provision sets the defaults and arranges for open responses to end when
// the server shuts down (Caddy's default grace period would wait forever).
func (o *Origin) Provision(ctx caddy.Context) error {
	o.logger = ctx.Logger()
	o.epoch = processStart
	o.done = make(chan struct{})
	if o.Interval == 0 {
		o.Interval = caddy.Duration(time.Second)
	}
	if o.Backlog == 0 {
		o.Backlog = 100
	}
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok {
		srv.RegisterOnShutdown(o.stop)
	}
	return nil
}

// Validate checks the configuration.
func (o *Origin) Validate() error {
	if o.Interval <= 0 {
		return fmt.Errorf("interval must be positive, got %v", time.Duration(o.Interval))
	}
	if o.Backlog < 0 {
		return fmt.Errorf("backlog must not be negative, got %d", o.Backlog)
	}
	return nil
}

// Cleanup ends every open response; it tolerates a half-finished Provision.
func (o *Origin) Cleanup() error {
	o.stop()
	return nil
}

// stop closes done, once.
func (o *Origin) stop() {
	o.stopOnce.Do(func() {
		if o.done != nil {
			close(o.done)
		}
	})
}

// ServeHTTP streams the events of r's path until the client goes away or
// the server shuts down.
func (o *Origin) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
	}
	path, lastID := r.URL.Path, r.Header.Get("Last-Event-ID")
	opened := time.Now()
	o.logger.Info("origin connection opened",
		zap.String("path", path),
		zap.String("last_event_id", lastID),
		zap.Int64("open_connections", o.open.Add(1)))
	sent := 0
	defer func() {
		o.logger.Info("origin connection closed",
			zap.String("path", path),
			zap.Int("events_sent", sent),
			zap.Duration("duration", time.Since(opened)),
			zap.Int64("open_connections", o.open.Add(-1)))
	}()

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	base := basePrice(path)
	buf := []byte("retry: 2000\n\n") // EventSource: reconnect after 2s
	next := o.firstID(lastID, o.current())
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		for cur := o.current(); next <= cur; next++ {
			buf = o.appendEvent(buf, next, base)
			sent++
		}
		if len(buf) > 0 {
			if _, err := w.Write(buf); err != nil {
				return nil
			}
			if err := rc.Flush(); err != nil {
				return nil
			}
			buf = buf[:0]
		}
		timer.Reset(time.Until(o.due(next)))
		select {
		case <-timer.C:
		case <-r.Context().Done():
			return nil
		case <-o.done:
			return nil
		}
	}
}

// current returns the id of the latest event that is due.
func (o *Origin) current() uint64 {
	return uint64(time.Since(o.epoch)/time.Duration(o.Interval)) + 1
}

// due returns the time event id is due.
func (o *Origin) due(id uint64) time.Time {
	return o.epoch.Add(time.Duration(id-1) * time.Duration(o.Interval))
}

// firstID returns the id of the first event to send to a client whose
// Last-Event-ID header is lastID, when the latest event is cur: the event
// after lastID, or the oldest of the backlog if lastID is older; cur when
// the header is absent, not one of ours, or ahead (the origin restarted).
func (o *Origin) firstID(lastID string, cur uint64) uint64 {
	last, err := strconv.ParseUint(lastID, 10, 64)
	if err != nil || last > cur {
		return cur
	}
	oldest := uint64(1)
	if cur > uint64(o.Backlog) {
		oldest = cur - uint64(o.Backlog) + 1
	}
	return max(last+1, oldest)
}

// appendEvent appends the wire form of event id to buf: its id and a JSON
// ticker payload, {"seq":id,"time":due time,"price":...,
// "origin_connections":n}, n being the connections the origin has open as
// it sends the event, which the demo page shows: 1 however many tabs
// watch through sse_fanout.
func (o *Origin) appendEvent(buf []byte, id uint64, base float64) []byte {
	price := base + 5*math.Sin(float64(id)/20) + 2*math.Sin(float64(id)/3.7)
	at := o.due(id).UTC().Format("2006-01-02T15:04:05.000Z07:00")
	return fmt.Appendf(buf, "id: %d\ndata: {\"seq\":%d,\"time\":%q,\"price\":%.2f,\"origin_connections\":%d}\n\n", id, id, at, price, o.open.Load())
}

// basePrice returns the price level of path's ticker, so that each path
// has a ticker of its own.
func basePrice(path string) float64 {
	h := fnv.New32a()
	h.Write([]byte(path))
	return 50 + float64(h.Sum32()%200)
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Origin)(nil)
	_ caddy.Validator             = (*Origin)(nil)
	_ caddy.CleanerUpper          = (*Origin)(nil)
	_ caddyhttp.MiddlewareHandler = (*Origin)(nil)
	_ caddyfile.Unmarshaler       = (*Origin)(nil)
)
