package ssefanout

import (
	"net/http"
	"reflect"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// streamWriter finds the ResponseWriter a client served through net/http
// (TLS, HTTP/2, HTTP/3) gets its events on after its head: beneath
// Caddy's own wrappers, when only wrappers known to pass writes through
// unchanged lie between. Through the server's write_idle_timeout wrapper,
// each event would cost a write deadline moved before its write and before
// its flush and, on HTTP/2, where moving a deadline is a message to the
// connection's goroutine, two more moves to clear them after. The idle
// timeout is not lost: it caps the bound returned, which the client's
// writes are held to with a deadline moved once per quarter of it
// (client.write).
//
// It returns a nil inner when anything else wraps w: a middleware that may
// change what is written, a buffering recorder, or an idle timeout a
// deadline cannot give (a minimum rate, or a cap from the server's
// write_timeout). skippedLog reports that Caddy's access log recorder was
// passed: the access log then counts the head and the first bytes only,
// and the module logs the stream's end itself.
func streamWriter(w http.ResponseWriter, bound time.Duration) (inner http.ResponseWriter, b time.Duration, skippedLog bool) {
	b = bound
	cur := w
	for range 16 { // Caddy's wrappers never nest deeper
		switch v := cur.(type) {
		case *caddyhttp.IdleTimeoutWriter:
			d := v.Deadline
			if d.MinRate > 0 || !d.HardDeadline.IsZero() {
				return nil, bound, false
			}
			if d.Timeout > 0 {
				b = min(b, d.Timeout)
			}
			cur = v.ResponseWriterWrapper.ResponseWriter
		case *caddyhttp.ResponseWriterWrapper:
			cur = v.ResponseWriter
		case caddyhttp.ResponseRecorder:
			if v.Buffered() || !passThrough[reflect.TypeOf(v).String()] {
				return nil, bound, false
			}
			u, ok := v.(interface{ Unwrap() http.ResponseWriter })
			if !ok {
				return nil, bound, false
			}
			skippedLog = true
			cur = u.Unwrap()
		case interface{ Unwrap() http.ResponseWriter }:
			if !passThrough[reflect.TypeOf(v).String()] {
				return nil, bound, false // a middleware's: it may change what is written
			}
			cur = v.Unwrap()
		default:
			return cur, b, skippedLog // net/http's (or HTTP/3's) own
		}
	}
	return nil, bound, false
}

// passThrough are the wrappers of Caddy's own that only count or watch
// what is written: its recorder (for access logs, and for handlers that
// buffer only some responses: skipped only when it does not buffer this
// one) and the wrapper routing read deadlines to the request's idle
// reader.
var passThrough = map[string]bool{
	"*caddyhttp.responseRecorder":   true,
	"*caddyhttp.readDeadlineWriter": true,
}
