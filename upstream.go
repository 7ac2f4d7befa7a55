package ssefanout

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/net/http/httpguts"
)

// Reconnect timing. A response that delivered an event is followed after
// the origin's retry (3s when it sent none, as browsers do); failures back
// off exponentially from failBase to failMax; a retry shorter than
// minReconnect is raised to it, so that an origin that sends one event and
// closes is never hammered, and one longer than maxOriginRetry is cut to
// it, so that it stays a valid duration.
const (
	defaultOriginRetry = 3 * time.Second
	failBase           = time.Second
	failMax            = 30 * time.Second
	retryAfterMax      = 5 * time.Minute
	minReconnect       = 100 * time.Millisecond
	maxOriginRetry     = 24 * time.Hour
	maxFinalBody       = 64 << 10
	// readBufferSize is what one upstream read takes in: the transport
	// buffers 4KiB in front of it, and a live stream holds it while it
	// waits for the origin, so it stays small.
	readBufferSize = 8 << 10
)

// errOtherHost refuses a redirect off the upstream's scheme and host: the
// request carries header_up values and vary headers meant for the origin.
var errOtherHost = errors.New("upstream redirected to another host")

// outcome is how one upstream attempt ended.
type outcome struct {
	delivered  bool          // at least one event or id block was published
	final      *finalAnswer  // a permanent answer: the stream ends
	retryAfter time.Duration // the origin's Retry-After on 429/503
	err        error
}

// upstream is the source of a stream on a single node: one request at a
// time to the origin, its body re-parsed as a browser would, reconnecting
// with Last-Event-ID after any end that is not final.
type upstream struct {
	// hub gives the transport, logger and settings in force, and the
	// header_up operations.
	hub    *hub
	target *url.URL
	header http.Header // the vary headers sent upstream
	name   string      // the stream's hash, for logs
	// resume is the Last-Event-ID to send until the origin commits an id
	// of its own (the id of the client that created the stream).
	resume string

	// once makes a single attempt, with no reconnect (a catch-up).
	once bool
	// label is the source label of the upstream metrics.
	label string

	// retry is the origin's latest retry; the reconnect delay follows it.
	retry    int64
	hasRetry bool

	// ids assigns the proxy's own ids (assign_ids); nil keeps the origin's.
	ids *idAssigner
}

// The sources of upstream requests, as the metrics label them.
const (
	sourceStream  = "stream"
	sourceCatchUp = "catch_up"
)

// newUpstream returns the upstream source of stream s.
func newUpstream(s *stream) *upstream {
	u := s.upstreamFrom(s.initialID, sourceStream)
	if s.hub.assignIDs {
		u.ids = newIDAssigner()
	}
	return u
}

// upstreamFrom returns an upstream request of stream s that starts from
// the Last-Event-ID resume ("" for none), counted in the metrics under
// label.
func (s *stream) upstreamFrom(resume, label string) *upstream {
	return &upstream{hub: s.hub, target: s.target, header: s.header, name: s.name, resume: resume, label: label}
}

// run connects, reads, and reconnects with Last-Event-ID after any end
// that is not final, until ctx ends.
func (u *upstream) run(ctx context.Context, sink sink) {
	p := newParser(int(u.hub.current().settings.maxEventSize))
	failures := 0
	for {
		o := u.attempt(ctx, p, sink)
		if ctx.Err() != nil {
			return
		}
		if u.once {
			if o.final != nil {
				sink.answer(answer{state: stateFinal, final: o.final})
			} else {
				sink.answer(answer{state: stateRetrying})
			}
			return
		}
		logger := u.hub.current().logger
		if o.final != nil {
			if ce := logger.Check(zapcore.DebugLevel, "upstream gave a final answer, stream ends"); ce != nil {
				ce.Write(zap.String("stream", u.name), zap.Int("status", o.final.status), zap.String("reason", o.final.reason))
			}
			sink.answer(answer{state: stateFinal, final: o.final})
			return
		}
		var delay time.Duration
		if o.delivered {
			failures = 0
			delay = defaultOriginRetry
			if u.hasRetry {
				delay = time.Duration(min(u.retry, maxOriginRetry.Milliseconds())) * time.Millisecond
			}
		} else {
			failures++
			delay = min(failBase<<min(failures-1, 10), failMax)
			delay = max(delay, min(o.retryAfter, retryAfterMax))
		}
		delay = max(jitter(delay), minReconnect)
		sink.answer(answer{state: stateRetrying})
		if ce := logger.Check(zapcore.DebugLevel, "upstream ended, reconnecting"); ce != nil {
			ce.Write(zap.String("stream", u.name), zap.Duration("delay", delay), zap.Int("failures", failures), zap.Error(o.err))
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
}

// jitter spreads d by ±10%.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return d - d/10 + rand.N(d/5+1)
}

// resumeID is the Last-Event-ID to send upstream: the origin's committed
// id once it has sent one, else the id the stream started from, so that
// the origin can fill the creating client's gap. That client's id only
// ever goes upstream: it is never an id that clients receive. Ids the
// proxy assigned never go upstream.
func (u *upstream) resumeID(p *parser) string {
	if p.hasID {
		return p.lastEventID()
	}
	return u.resume
}

// attempt makes one upstream request and reads its events until it ends.
func (u *upstream) attempt(ctx context.Context, p *parser, sink sink) outcome {
	cfg := u.hub.current()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ctx = context.WithValue(ctx, caddy.ReplacerCtxKey, caddy.NewReplacer())

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.target.String(), nil)
	if err != nil {
		return outcome{final: badGateway("bad upstream URL\n")}
	}
	req.Header = u.header.Clone()
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	// an origin may commit an id no header can carry (control characters):
	// resume without it rather than fail every attempt
	if id := u.resumeID(p); id != "" && httpguts.ValidHeaderFieldValue(id) {
		req.Header.Set("Last-Event-ID", id)
	}
	if ops := u.hub.headerUp; ops != nil {
		ops.ApplyTo(req.Header, caddy.NewEmptyReplacer())
		if host := req.Header.Get("Host"); host != "" {
			req.Host = host
			req.Header.Del("Host")
		}
	}
	hc := &http.Client{Transport: cfg.rt, CheckRedirect: func(next *http.Request, via []*http.Request) error {
		if len(via) >= maxRedirects {
			return fmt.Errorf("stopped after %d redirects", maxRedirects)
		}
		// header_up secrets and vary headers go with a redirect: follow
		// it only on the configured scheme and host
		if next.URL.Scheme != via[0].URL.Scheme || next.URL.Host != via[0].URL.Host {
			return errOtherHost
		}
		return nil
	}}
	resp, err := hc.Do(req)
	if err != nil {
		o := outcome{err: withoutURL(err)}
		if errors.Is(err, errOtherHost) {
			o = outcome{final: badGateway("upstream redirected to another host\n")}
		}
		countAttempt(u.label, o)
		return o
	}
	defer resp.Body.Close()
	o := classify(resp)
	countAttempt(u.label, o)
	if o.err != nil || o.final != nil {
		return o
	}
	conns := metrics.upstreamConns.WithLabelValues(u.label)
	conns.Inc()
	defer conns.Dec()
	sink.answer(answer{state: stateLive, header: streamHeaders(resp.Header)})
	if ce := cfg.logger.Check(zapcore.DebugLevel, "upstream connected"); ce != nil {
		ce.Write(zap.String("stream", u.name))
	}
	o = u.read(ctx, cancel, resp.Body, p, sink, cfg)
	o.err = withoutURL(o.err)
	return o
}

// withoutURL strips the request URL that net/http puts in its errors: it
// can hold a tenant's path, a token in the query, or a redirect's
// Location. What is left names the cause ("connection refused", "stopped
// after 10 redirects") and at most the configured host.
func withoutURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// classify sorts an upstream answer: an event stream (the zero outcome), a
// passing failure worth retrying, or a permanent answer for the clients.
func classify(resp *http.Response) outcome {
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusSwitchingProtocols, http.StatusContinue, http.StatusProcessing, http.StatusEarlyHints:
		// nobody asked to switch protocols, and an informational answer
		// is no answer: relayed, a 101 would make a proxy in front
		// tunnel raw bytes
		return outcome{final: badGateway(fmt.Sprintf("upstream answered %d, not an event stream\n", resp.StatusCode))}
	case http.StatusTooManyRequests, http.StatusServiceUnavailable:
		return outcome{err: errors.New(resp.Status), retryAfter: parseRetryAfter(resp.Header.Get("Retry-After"))}
	case http.StatusBadGateway, http.StatusGatewayTimeout:
		return outcome{err: errors.New(resp.Status)}
	case http.StatusNoContent:
		return outcome{final: &finalAnswer{status: http.StatusNoContent, header: http.Header{}}}
	default:
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxFinalBody))
		return outcome{final: &finalAnswer{status: resp.StatusCode, header: passHeaders(resp.Header), body: body}}
	}
	ct := resp.Header.Get("Content-Type")
	if mediaEssence(ct) != "text/event-stream" {
		return outcome{final: badGateway(fmt.Sprintf("upstream answered 200 with Content-Type %q, not text/event-stream\n", ct))}
	}
	return outcome{}
}

// badGateway is the proxy's own permanent answer, with a short reason.
func badGateway(reason string) *finalAnswer {
	return &finalAnswer{status: http.StatusBadGateway, header: http.Header{"Content-Type": {"text/plain; charset=utf-8"}}, body: []byte(reason), reason: strings.TrimSpace(reason)}
}

// countAttempt counts an upstream request by its source and outcome.
func countAttempt(source string, o outcome) {
	switch {
	case o.final != nil:
		metrics.attempts.WithLabelValues(source, "permanent").Inc()
	case o.err != nil:
		metrics.attempts.WithLabelValues(source, "transient").Inc()
	default:
		metrics.attempts.WithLabelValues(source, "stream").Inc()
	}
}

// read feeds the response body to the parser and appends what it finds
// to the sink. An upstream silent past upstream_idle_timeout is dropped
// (any byte, comments included, counts as activity).
func (u *upstream) read(ctx context.Context, cancel context.CancelFunc, body io.Reader, p *parser, sink sink, cfg hubConfig) outcome {
	var o outcome
	set := cfg.settings
	p.reset()
	p.setMaxEventSize(int(set.maxEventSize)) // the settings in force now
	tracker, _ := sink.(originTracker)
	emit := func(r *record) {
		if tracker != nil && r.hasID && (r.kind == recEvent || r.kind == recID) {
			tracker.originID(r.id) // the origin's, before any proxy id
		}
		switch r.kind {
		case recEvent:
			if u.ids != nil {
				u.ids.assign(r, u, cfg)
			}
			// encoded once, straight into its chunk frame
			n := encodedLen(r)
			frame := newFrame(n)
			hdr := uint8(len(frame))
			frame = closeFrame(appendEvent(frame, r))
			sink.append(entry{kind: entryEvent, frame: frame, hdr: hdr, id: r.id, setsID: r.setsID, hasID: r.hasID})
			o.delivered = true
		case recID:
			o.delivered = true
			if u.ids != nil {
				u.ids.originID(u, cfg) // the origin's ids are not the stream's
				return
			}
			sink.append(idEntry(r))
		case recRetry:
			u.retry, u.hasRetry = r.retry, true
			frame, hdr := frameOf(appendRetry(nil, r.retry))
			sink.append(entry{kind: entryRetry, frame: frame, hdr: hdr, retry: r.retry})
		case recSkipped:
			metrics.eventsSkipped.Inc()
			cfg.logger.Warn("skipped an upstream event larger than max_event_size", zap.String("stream", u.name), zap.Int64("size", r.size), zap.Int64("max_event_size", set.maxEventSize))
			if r.setsID && u.ids == nil {
				sink.append(idEntry(r))
			}
		}
	}
	var idle *time.Timer
	if set.idleTimeout > 0 {
		idle = time.AfterFunc(set.idleTimeout, cancel)
		defer idle.Stop()
	}
	buf := make([]byte, readBufferSize)
	for {
		n, err := body.Read(buf)
		if n > 0 {
			if idle != nil {
				idle.Reset(set.idleTimeout)
			}
			p.feed(buf[:n], emit)
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				o.err = err
			}
			if idle != nil && !idle.Stop() && ctx.Err() != nil {
				o.err = errors.New("upstream idle timeout")
			}
			return o
		}
	}
}

// originTracker is a sink that keeps the origin's own committed id, to
// resume a stream's upstream elsewhere (the cluster's log).
type originTracker interface {
	originID(id string)
}

// idEntry is the id-only block that commits r's id.
func idEntry(r *record) entry {
	frame, hdr := frameOf(appendIDBlock(nil, r.id))
	return entry{kind: entryID, frame: frame, hdr: hdr, id: r.id, setsID: true, hasID: r.hasID}
}

// mediaEssence is a Content-Type's type/subtype, lowercased, before any
// parameter: what EventSource compares.
func mediaEssence(ct string) string {
	ct, _, _ = strings.Cut(ct, ";")
	return strings.ToLower(strings.TrimSpace(ct))
}

// parseRetryAfter reads Retry-After in seconds or as an HTTP date.
func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(v); err == nil && secs > 0 {
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return time.Until(t)
	}
	return 0
}

// hopHeaders are never passed on (RFC 9110 §7.6.1).
var hopHeaders = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// passHeaders copies the origin's response headers minus hop-by-hop ones,
// cookies (the response is shared) and those net/http sets itself.
func passHeaders(in http.Header) http.Header {
	out := in.Clone()
	for _, name := range hopHeaders {
		out.Del(name)
	}
	for _, v := range in.Values("Connection") {
		for name := range strings.SplitSeq(v, ",") {
			out.Del(strings.TrimSpace(name))
		}
	}
	out.Del("Set-Cookie")
	out.Del("Content-Length")
	out.Del("Date")
	return out
}

// streamHeaders are the origin's response headers passed on to every client
// of a live stream: no framing or caching headers, which the proxy owns.
func streamHeaders(in http.Header) http.Header {
	out := passHeaders(in)
	for name := range out {
		if strings.HasPrefix(name, "Content-") {
			delete(out, name)
		}
	}
	for _, name := range []string{"Cache-Control", "Etag", "Last-Modified", "Vary", "Expires", "Age", "Server"} {
		out.Del(name)
	}
	return out
}

// idAssigner gives each event of a stream the proxy's own id,
// `<epoch>-<sequence>` (assign_ids), for origins that send none. The epoch
// is random and new with every life of the stream's history, so that an id
// from another life is unknown, never wrong.
type idAssigner struct {
	epoch  string
	seq    uint64
	warned bool // the origin sent ids of its own; said once per stream
}

func newIDAssigner() *idAssigner {
	return &idAssigner{epoch: newEpoch()}
}

// assign sets r's id to the next proxy id, replacing any the origin sent.
func (a *idAssigner) assign(r *record, u *upstream, cfg hubConfig) {
	if r.setsID {
		a.originID(u, cfg)
	}
	a.seq++
	r.id = a.epoch + "-" + strconv.FormatUint(a.seq, 10)
	r.hasID, r.setsID = true, true
}

// originID notes that the origin sends ids of its own, which the proxy's
// replace: logged once per stream, as the two are never mixed.
func (a *idAssigner) originID(u *upstream, cfg hubConfig) {
	if !a.warned {
		a.warned = true
		cfg.logger.Warn("the origin sends ids of its own; with assign_ids the proxy's replace them", zap.String("stream", u.name))
	}
}
