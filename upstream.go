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
// closes is never hammered.
const (
	defaultOriginRetry = 3 * time.Second
	failBase           = time.Second
	failMax            = 30 * time.Second
	retryAfterMax      = 5 * time.Minute
	minReconnect       = 100 * time.Millisecond
	maxFinalBody       = 64 << 10
	readBufferSize     = 32 << 10
)

// upstreamTemplate is the parsed upstream base URL: a fixed scheme and
// host, and a path and query that may hold request placeholders.
type upstreamTemplate struct {
	scheme, host string
	path, query  string
	dynamic      bool // path or query hold placeholders
}

// parseUpstream splits the upstream base URL and checks that its scheme
// and host are static (or {env.*}), so that no request can choose where
// the proxy connects.
func parseUpstream(raw string) (*upstreamTemplate, error) {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return nil, fmt.Errorf("upstream %q: must be an absolute URL like http://127.0.0.1:3000/events", raw)
	}
	end := strings.IndexAny(rest, "/?")
	if end < 0 {
		end = len(rest)
	}
	authority, pathQuery := rest[:end], rest[end:]
	if p := firstPlaceholder(scheme+authority, "env."); p != "" {
		return nil, fmt.Errorf("upstream %q: placeholder %s is not allowed in the scheme or host, which must be static (or {env.*}); request placeholders may appear in the path and query", raw, p)
	}
	repl := caddy.NewReplacer()
	base, err := url.Parse(repl.ReplaceAll(scheme, "") + "://" + repl.ReplaceAll(authority, ""))
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %v", raw, err)
	}
	if base.Scheme != "http" && base.Scheme != "https" {
		return nil, fmt.Errorf("upstream %q: scheme must be http or https", raw)
	}
	if base.Host == "" || base.User != nil {
		return nil, fmt.Errorf("upstream %q: needs a host and no user info", raw)
	}
	t := &upstreamTemplate{scheme: base.Scheme, host: base.Host}
	t.path, t.query, _ = strings.Cut(pathQuery, "?")
	t.dynamic = strings.ContainsRune(pathQuery, '{')
	if !t.dynamic {
		if _, err := url.PathUnescape(t.path); err != nil {
			return nil, fmt.Errorf("upstream %q: bad path: %v", raw, err)
		}
	}
	return t, nil
}

// build returns the upstream URL for a request: the base path followed by
// the request's escaped path (plain concatenation, never reference
// resolution), and the base query followed by the request's query minus
// lastEventId. A path that decodes to dot-segments or holds a backslash is
// refused, so the request stays under the base path on any origin.
func (t *upstreamTemplate) build(r *http.Request, repl *caddy.Replacer) (*url.URL, error) {
	basePath, baseQuery := t.path, t.query
	if t.dynamic && repl != nil {
		basePath = repl.ReplaceAll(basePath, "")
		baseQuery = repl.ReplaceAll(baseQuery, "")
	}
	reqPath := r.URL.EscapedPath()
	if reqPath != "" && reqPath[0] != '/' {
		// e.g. the asterisk form "GET *": it would extend the base
		// path's last segment instead of going below it
		return nil, errors.New("request path must start with a slash")
	}
	if strings.HasSuffix(basePath, "/") && strings.HasPrefix(reqPath, "/") {
		basePath = basePath[:len(basePath)-1]
	}
	rawPath := basePath + reqPath
	path, err := url.PathUnescape(rawPath)
	if err != nil {
		return nil, fmt.Errorf("bad path escape: %v", err)
	}
	if strings.ContainsRune(path, '\\') || hasDotSegment(path) {
		return nil, errors.New("path has dot-segments or backslashes")
	}
	query := baseQuery
	if q := withoutLastEventID(r.URL.RawQuery); q != "" {
		if query != "" {
			query += "&"
		}
		query += q
	}
	return &url.URL{Scheme: t.scheme, Host: t.host, Path: path, RawPath: rawPath, RawQuery: query}, nil
}

// hasDotSegment reports whether a decoded path has a "." or ".." segment.
func hasDotSegment(p string) bool {
	for seg := range strings.SplitSeq(p, "/") {
		if seg == "." || seg == ".." {
			return true
		}
	}
	return false
}

// withoutLastEventID drops the lastEventId parameter (an EventSource
// polyfill's resume hint, not part of the stream) and keeps the rest of the
// query as the client wrote it.
func withoutLastEventID(raw string) string {
	if !strings.Contains(raw, "astEventId") && !strings.Contains(raw, "%") {
		return raw
	}
	var b strings.Builder
	for part := range strings.SplitSeq(raw, "&") {
		name, _, _ := strings.Cut(part, "=")
		if n, err := url.QueryUnescape(name); err == nil && n == "lastEventId" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('&')
		}
		b.WriteString(part)
	}
	return b.String()
}

// firstPlaceholder returns the first {placeholder} in s whose name does not
// start with one of the allowed prefixes, or "".
func firstPlaceholder(s string, allowed ...string) string {
	for {
		i := strings.IndexByte(s, '{')
		if i < 0 {
			return ""
		}
		j := strings.IndexByte(s[i:], '}')
		if j < 0 {
			return ""
		}
		name := s[i+1 : i+j]
		ok := false
		for _, a := range allowed {
			ok = ok || strings.HasPrefix(name, a)
		}
		if !ok && name != "" && !strings.HasPrefix(s[max(i-1, 0):], `\`) {
			return s[i : i+j+1]
		}
		s = s[i+j+1:]
	}
}

// requestPlaceholder returns the first placeholder in s that is not one of
// the non-request ones allowed in header_up, or "".
func requestPlaceholder(s string) string {
	return firstPlaceholder(s, "env.", "file.", "system.")
}

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
	_, _, set := s.hub.transport()
	p := newParser(int(set.maxEventSize))
	if s.initialID != "" {
		p.setLastEventID(s.initialID)
	}
	failures := 0
	for {
		o := s.attempt(p)
		if s.ctx.Err() != nil {
			return
		}
		if o.final != nil {
			s.setState(stateFinal, nil, o.final)
			return
		}
		var delay time.Duration
		if o.delivered {
			failures = 0
			delay = time.Duration(s.originRetry()) * time.Millisecond
			if delay == 0 {
				delay = defaultOriginRetry
			}
		} else {
			failures++
			delay = min(failBase<<min(failures-1, 10), failMax)
			delay = max(delay, min(o.retryAfter, retryAfterMax))
		}
		delay = max(jitter(delay), minReconnect)
		s.setState(stateRetrying, nil, nil)
		_, logger, _ := s.hub.transport()
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

func (s *stream) originRetry() int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.retry
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
	if id := p.lastEventID(); id != "" && httpguts.ValidHeaderFieldValue(id) {
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
			return fmt.Errorf("%w: %s", errOtherHost, next.URL.Redacted())
		}
		return nil
	}}
	resp, err := hc.Do(req)
	if err != nil {
		o := outcome{err: err}
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
	return s.read(ctx, cancel, resp.Body, p, set)
}

// classify sorts an upstream answer: an event stream (the zero outcome), a
// passing failure worth retrying, or a permanent answer for the clients.
func classify(resp *http.Response) outcome {
	switch resp.StatusCode {
	case http.StatusOK:
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
	return &finalAnswer{status: http.StatusBadGateway, header: http.Header{"Content-Type": {"text/plain; charset=utf-8"}}, body: []byte(reason)}
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
