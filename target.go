package ssefanout

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"golang.org/x/net/http/httpguts"
)

// What a request maps to: the upstream URL it is served from, the key of
// the stream that shares it, and the client's resume point. Everything a
// request can put into the upstream URL goes through here, and comes out
// escaped so that no request reaches another one's stream or leaves the
// configured base.

// upstreamTemplate is the parsed upstream base URL: a fixed scheme and
// host, and a path and query that may hold request placeholders. The
// load-time placeholders ({env.*}, {file.*}, {system.*}) are resolved when
// it is parsed; the others expand per request.
type upstreamTemplate struct {
	raw          string // as configured, for the admin view
	scheme, host string
	path         []tmplPart
	query        []tmplPart
	// fixed holds the decoded names of the base query's parameters: a
	// client's query may add parameters, never repeat one of these.
	fixed   map[string]bool
	dynamic bool // path or query expand per request
}

// tmplPart is literal text, or a placeholder when name is set.
type tmplPart struct {
	lit  string
	name string
}

// loadTimePrefixes are the placeholders that do not depend on the request.
var loadTimePrefixes = []string{"env.", "file.", "system."}

// parseUpstream splits the upstream base URL and checks that its scheme
// and host are static (or {env.*}), so that no request can choose where
// the proxy connects, and that request placeholders stand only where
// their value can be escaped: in path segments and query values.
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
	t := &upstreamTemplate{raw: raw, scheme: base.Scheme, host: base.Host, fixed: map[string]bool{}}
	rawPath, rawQuery, _ := strings.Cut(pathQuery, "?")
	if t.path, err = splitTemplate(rawPath, repl); err != nil {
		return nil, fmt.Errorf("upstream %q: %v", raw, err)
	}
	if t.query, err = splitTemplate(rawQuery, repl); err != nil {
		return nil, fmt.Errorf("upstream %q: %v", raw, err)
	}
	for part := range strings.SplitSeq(rawQuery, "&") {
		name, _, _ := strings.Cut(part, "=")
		if strings.ContainsAny(name, "{}") {
			return nil, fmt.Errorf("upstream %q: placeholders may stand in query values, not in parameter names (%q)", raw, name)
		}
		if n, err := url.QueryUnescape(name); err == nil && n != "" {
			t.fixed[n] = true
		}
	}
	t.dynamic = hasPlaceholder(t.path) || hasPlaceholder(t.query)
	if !t.dynamic {
		if _, err := url.PathUnescape(joinLiterals(t.path)); err != nil {
			return nil, fmt.Errorf("upstream %q: bad path: %v", raw, err)
		}
	}
	return t, nil
}

// splitTemplate cuts s into literal text and placeholders, with Caddy's
// syntax (`\{` and `\}` are literal braces). Load-time placeholders are
// resolved now, unescaped: they are the operator's, not a request's.
func splitTemplate(s string, repl *caddy.Replacer) ([]tmplPart, error) {
	var parts []tmplPart
	var lit strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '\\' && i+1 < len(s) && (s[i+1] == '{' || s[i+1] == '}') {
			lit.WriteByte(s[i+1])
			i++
			continue
		}
		if c != '{' {
			lit.WriteByte(c)
			continue
		}
		end := strings.IndexByte(s[i:], '}')
		if end < 0 {
			return nil, fmt.Errorf("unclosed placeholder in %q", s)
		}
		name := s[i+1 : i+end]
		i += end
		if hasAnyPrefix(name, loadTimePrefixes) {
			v, _ := repl.Get(name)
			lit.WriteString(caddy.ToString(v))
			continue
		}
		if lit.Len() > 0 {
			parts = append(parts, tmplPart{lit: lit.String()})
			lit.Reset()
		}
		parts = append(parts, tmplPart{name: name})
	}
	if lit.Len() > 0 || len(parts) == 0 {
		parts = append(parts, tmplPart{lit: lit.String()})
	}
	return parts, nil
}

func hasPlaceholder(parts []tmplPart) bool {
	for _, p := range parts {
		if p.name != "" {
			return true
		}
	}
	return false
}

func joinLiterals(parts []tmplPart) string {
	var b strings.Builder
	for _, p := range parts {
		b.WriteString(p.lit)
	}
	return b.String()
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// badRequest is a request the handler refuses with 400: public is the one
// line the client reads, detail what the debug log adds.
type badRequest struct {
	public string
	detail string
}

func (e *badRequest) Error() string {
	if e.detail == "" {
		return e.public
	}
	return e.public + ": " + e.detail
}

func refuse(public, detail string) error { return &badRequest{public: public, detail: detail} }

// build returns the upstream URL for a request, and what its placeholders
// expanded to (part of the stream key): the base path followed by the
// request's escaped path (plain concatenation, never reference
// resolution), and the base query followed by the request's query minus
// lastEventId and minus any parameter the base query sets.
//
// A placeholder in the path expands to exactly one path segment (a `/` in
// its value is escaped) and never to nothing, so that no value can turn
// the base into another tenant's prefix; one in the query expands to an
// escaped query value. A path whose decoded segments a server could take
// for a parent directory (`..`, `..;x`, `..%00`, `.;`), or that holds a
// backslash or a control character, is refused.
func (t *upstreamTemplate) build(r *http.Request, repl *caddy.Replacer) (*url.URL, []string, error) {
	var expansions []string
	expand := func(parts []tmplPart, inPath bool) (string, error) {
		if len(parts) == 1 && parts[0].name == "" {
			return parts[0].lit, nil
		}
		var b strings.Builder
		for _, p := range parts {
			if p.name == "" {
				b.WriteString(p.lit)
				continue
			}
			var v string
			if repl != nil {
				val, _ := repl.Get(p.name)
				v = caddy.ToString(val)
			}
			expansions = append(expansions, v)
			if !inPath {
				b.WriteString(url.QueryEscape(v))
				continue
			}
			if v == "" {
				return "", refuse("a value the upstream path needs is missing", "placeholder {"+p.name+"} is empty")
			}
			b.WriteString(url.PathEscape(v))
		}
		return b.String(), nil
	}
	basePath, err := expand(t.path, true)
	if err != nil {
		return nil, nil, err
	}
	baseQuery, err := expand(t.query, false)
	if err != nil {
		return nil, nil, err
	}

	reqPath := r.URL.EscapedPath()
	if reqPath != "" && reqPath[0] != '/' {
		// e.g. the asterisk form "GET *": it would extend the base
		// path's last segment instead of going below it
		return nil, nil, refuse("the request path must start with a slash", "")
	}
	if strings.HasSuffix(basePath, "/") && strings.HasPrefix(reqPath, "/") {
		basePath = basePath[:len(basePath)-1]
	}
	rawPath := basePath + reqPath
	path, err := url.PathUnescape(rawPath)
	if err != nil {
		return nil, nil, refuse("bad percent-escape in the path", err.Error())
	}
	if err := checkPath(path); err != nil {
		return nil, nil, err
	}

	query := baseQuery
	if q := t.clientQuery(r.URL.RawQuery); q != "" {
		if hasControl(q) || strings.ContainsRune(q, ' ') {
			return nil, nil, refuse("control character in the query", "")
		}
		if query != "" {
			query += "&"
		}
		query += q
	}
	return &url.URL{Scheme: t.scheme, Host: t.host, Path: path, RawPath: rawPath, RawQuery: query}, expansions, nil
}

// checkPath refuses a decoded upstream path that could leave the base on
// some server: a backslash (a separator on some), a control character, or
// a segment that is, or that a server may read as, "." or "..": Tomcat and
// others cut a segment at `;` (a path parameter), and some stop at NUL or
// trim what follows the dots.
func checkPath(path string) error {
	if strings.ContainsRune(path, '\\') {
		return refuse("backslash in the path", "")
	}
	if hasControl(path) {
		return refuse("control character in the path", "")
	}
	for seg := range strings.SplitSeq(path, "/") {
		name, _, _ := strings.Cut(seg, ";")
		if name == "." || name == ".." || strings.HasPrefix(seg, "..") {
			return refuse("dot-segment in the path", "")
		}
	}
	return nil
}

// hasControl reports whether s holds an ASCII control character.
func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
}

// clientQuery is the part of a request's query that goes upstream: every
// parameter as the client wrote it, except lastEventId (an EventSource
// polyfill's resume hint, not part of the stream) and those the base query
// sets, which a client must not repeat (origins differ on which of two
// values wins).
func (t *upstreamTemplate) clientQuery(raw string) string {
	if raw == "" || (len(t.fixed) == 0 && !strings.Contains(raw, "astEventId") && !strings.Contains(raw, "%")) {
		return raw
	}
	var b strings.Builder
	for part := range strings.SplitSeq(raw, "&") {
		name, _, _ := strings.Cut(part, "=")
		if n, err := url.QueryUnescape(name); err == nil && (n == "lastEventId" || t.fixed[n]) {
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
		if !hasAnyPrefix(name, allowed) && name != "" && !strings.HasPrefix(s[max(i-1, 0):], `\`) {
			return s[i : i+j+1]
		}
		s = s[i+j+1:]
	}
}

// requestPlaceholder returns the first placeholder in s that is not one of
// the load-time ones allowed in header_up, or "".
func requestPlaceholder(s string) string {
	return firstPlaceholder(s, loadTimePrefixes...)
}

// streamKey identifies a stream: the upstream URL, what each placeholder
// expanded to, and, for each vary header, its presence and all its values.
// Each part is length-prefixed, so that no two distinct requests produce
// the same key, even where their URLs meet (two placeholders in one
// segment, say). A request with neither is keyed by its URL alone.
func streamKey(target string, expansions []string, vary []string, hdr http.Header) string {
	if len(vary) == 0 && len(expansions) == 0 {
		return target
	}
	b := make([]byte, 0, len(target)+32)
	b = append(b, 'k')
	b = appendLP(b, target)
	b = strconv.AppendInt(b, int64(len(expansions)), 10)
	for _, e := range expansions {
		b = appendLP(b, e)
	}
	for _, name := range vary {
		vals, ok := hdr[name]
		if !ok {
			b = append(b, '-')
			continue
		}
		b = append(b, '+')
		b = strconv.AppendInt(b, int64(len(vals)), 10)
		for _, v := range vals {
			b = appendLP(b, v)
		}
	}
	return string(b)
}

func appendLP(b []byte, s string) []byte {
	b = strconv.AppendInt(b, int64(len(s)), 10)
	b = append(b, ':')
	return append(b, s...)
}

// keyHash is a short digest of a stream key for logs, the admin view and
// the status page, which must never carry the URL or the vary values
// (credentials). It is keyed with a secret of the process: an unkeyed hash
// would let anyone who sees it confirm a guessed path, tenant or value.
func keyHash(key string) string {
	m := hmac.New(sha256.New, hashSecret)
	_, _ = m.Write([]byte(key))
	return hex.EncodeToString(m.Sum(nil)[:8])
}

// hashSecret keys keyHash; each process has its own.
var hashSecret = func() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return b
}()

// lastID is a Last-Event-ID, a client's or a stream's committed one: an
// empty id that was sent is not the same as none.
type lastID struct {
	id  string
	set bool
}

// clientLastID returns the client's Last-Event-ID: the header, or the
// lastEventId query parameter when the header is absent (for polyfills that
// cannot set headers). One longer than 1KiB, or that is no valid header
// value, is treated as absent: it could never resume anything, and would
// make every upstream request fail.
func clientLastID(r *http.Request) lastID {
	vals, ok := r.Header["Last-Event-Id"]
	var id string
	if ok && len(vals) > 0 {
		id = vals[0]
	} else if q := r.URL.Query(); q.Has("lastEventId") {
		ok, id = true, q.Get("lastEventId")
	}
	if !ok || len(id) > maxLastEventIDLen || !httpguts.ValidHeaderFieldValue(id) {
		return lastID{}
	}
	return lastID{id: id, set: true}
}
