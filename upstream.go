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

// run is the stream's upstream loop: connect, read, and reconnect with
// Last-Event-ID after any end that is not permanent, until the stream is
// closed.
func (s *stream) run() {
	defer func() {
		s.hub.remove(s)
		close(s.done)
		s.signal() // clients see done
	}()
	if s.after != nil {
		select {
		case <-s.after:
		case <-s.ctx.Done():
			return
		}
	}
	_, _, set := s.hub.transport()
	p := newParser(int(set.maxEventSize))
	failures := 0
	for {
		o := s.attempt(p)
		if s.ctx.Err() != nil {
			return
		}
		_, logger, _ := s.hub.transport()
		if o.final != nil {
			if ce := logger.Check(zapcore.DebugLevel, "upstream gave a final answer, stream ends"); ce != nil {
				ce.Write(zap.String("stream", s.name), zap.Int("status", o.final.status), zap.String("reason", o.final.reason))
			}
			s.setState(stateFinal, nil, o.final)
			return
		}
		var delay time.Duration
		if o.delivered {
			failures = 0
			delay = defaultOriginRetry
			if ms, ok := s.originRetry(); ok {
				delay = time.Duration(min(ms, maxOriginRetry.Milliseconds())) * time.Millisecond
			}
		} else {
			failures++
			delay = min(failBase<<min(failures-1, 10), failMax)
			delay = max(delay, min(o.retryAfter, retryAfterMax))
		}
		delay = max(jitter(delay), minReconnect)
		s.setState(stateRetrying, nil, nil)
		if ce := logger.Check(zapcore.DebugLevel, "upstream ended, reconnecting"); ce != nil {
			ce.Write(zap.String("stream", s.name), zap.Duration("delay", delay), zap.Int("failures", failures), zap.Error(o.err))
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-s.ctx.Done():
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

// originRetry returns the origin's latest retry in ms, if it sent one.
func (s *stream) originRetry() (int64, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.retry, s.hasRetry
}

// resumeID is the Last-Event-ID to send upstream: the origin's committed
// id once it has sent one, else the id of the client that created the
// stream, so that the origin can fill that client's gap. The client's id
// only ever goes upstream: it is never an id other clients receive.
func (s *stream) resumeID(p *parser) string {
	if p.hasID {
		return p.lastEventID()
	}
	return s.initialID
}

// attempt makes one upstream request and reads its events until it ends.
func (s *stream) attempt(p *parser) outcome {
	rt, logger, set := s.hub.transport()
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	ctx = context.WithValue(ctx, caddy.ReplacerCtxKey, caddy.NewReplacer())

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.target.String(), nil)
	if err != nil {
		return outcome{final: badGateway("bad upstream URL\n")}
	}
	req.Header = s.header.Clone()
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	// an origin may commit an id no header can carry (control characters):
	// resume without it rather than fail every attempt
	if id := s.resumeID(p); id != "" && httpguts.ValidHeaderFieldValue(id) {
		req.Header.Set("Last-Event-ID", id)
	}
	if ops := s.hub.headerUp; ops != nil {
		ops.ApplyTo(req.Header, caddy.NewEmptyReplacer())
		if host := req.Header.Get("Host"); host != "" {
			req.Host = host
			req.Header.Del("Host")
		}
	}
	hc := &http.Client{Transport: rt, CheckRedirect: func(next *http.Request, via []*http.Request) error {
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
		countAttempt(o)
		return o
	}
	defer resp.Body.Close()
	o := classify(resp)
	countAttempt(o)
	if o.err != nil || o.final != nil {
		return o
	}
	metrics.upstreamConns.Inc()
	defer metrics.upstreamConns.Dec()
	s.setState(stateLive, streamHeaders(resp.Header), nil)
	if ce := logger.Check(zapcore.DebugLevel, "upstream connected"); ce != nil {
		ce.Write(zap.String("stream", s.name))
	}
	o = s.read(ctx, cancel, resp.Body, p, set)
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

// countAttempt counts an upstream request by its outcome.
func countAttempt(o outcome) {
	switch {
	case o.final != nil:
		metrics.attempts.WithLabelValues("permanent").Inc()
	case o.err != nil:
		metrics.attempts.WithLabelValues("transient").Inc()
	default:
		metrics.attempts.WithLabelValues("stream").Inc()
	}
}

// read feeds the response body to the parser and publishes what it finds.
// An upstream silent past upstream_idle_timeout is dropped (any byte,
// comments included, counts as activity).
func (s *stream) read(ctx context.Context, cancel context.CancelFunc, body io.Reader, p *parser, set hubSettings) outcome {
	var o outcome
	p.reset()
	p.setMaxEventSize(int(set.maxEventSize)) // the settings in force now
	emit := func(r *record) {
		switch r.kind {
		case recEvent:
			metrics.events.Inc()
			wire := appendEvent(make([]byte, 0, encodedLen(r)), r)
			s.publish(entryEvent, wire, r.id, r.setsID, r.hasID)
			o.delivered = true
		case recID:
			s.publish(entryID, appendIDBlock(nil, r.id), r.id, true, r.hasID)
			o.delivered = true
		case recRetry:
			s.setRetry(r.retry)
			s.publish(entryRetry, appendRetry(nil, r.retry), "", false, false)
		case recSkipped:
			metrics.eventsSkipped.Inc()
			_, logger, _ := s.hub.transport()
			logger.Warn("skipped an upstream event larger than max_event_size", zap.String("stream", s.name), zap.Int64("size", r.size), zap.Int64("max_event_size", set.maxEventSize))
			if r.setsID {
				s.publish(entryID, appendIDBlock(nil, r.id), r.id, true, r.hasID)
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
			if ctx.Err() != nil && s.ctx.Err() == nil {
				o.err = errors.New("upstream idle timeout")
			}
			return o
		}
	}
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
