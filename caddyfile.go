package ssefanout

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("sse_fanout", parseCaddyfile)
	// sse_fanout answers the request, like reverse_proxy: run it at the
	// same point, so that no global order option is needed.
	httpcaddyfile.RegisterDirectiveOrder("sse_fanout", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var handler Handler
	err := handler.UnmarshalCaddyfile(h.Dispenser)
	return &handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	sse_fanout [<matcher>] <upstream-base-url> {
//	    history               <n>
//	    history_bytes         <size>
//	    replay                <n>
//	    keepalive             <duration>|off
//	    linger                <duration>|off
//	    write_timeout         <duration>
//	    status_wait           <duration>
//	    max_event_size        <size>
//	    max_clients           <n>
//	    max_streams           <n>|off
//	    retry                 <duration>
//	    vary                  <header...>
//	    header_up             [+|-]<field> [<value>]
//	    upstream_idle_timeout <duration>
//	    drain                 <duration>
//	    client_send_buffer    <size>|off
//	    transport http {
//	        <reverse_proxy http transport options>
//	    }
//	}
//
// Every option is described on the Handler's fields.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if !d.NextArg() {
		return d.Errf("missing upstream base URL, e.g. 'sse_fanout http://127.0.0.1:3000/events'")
	}
	h.Upstream = d.Val()
	if d.NextArg() {
		return d.Errf("unexpected argument %q after the upstream; options go in a block", d.Val())
	}
	if _, err := parseUpstream(h.Upstream); err != nil {
		return d.Errf("%v", err)
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		opt := d.Val()
		if seen[opt] && opt != "header_up" && opt != "vary" {
			return d.Errf("%s: specified more than once", opt)
		}
		seen[opt] = true
		if err := h.unmarshalOption(d, opt); err != nil {
			return err
		}
	}
	return h.checkCaddyfile(d)
}

// unmarshalOption parses one option line of the block.
func (h *Handler) unmarshalOption(d *caddyfile.Dispenser, opt string) error {
	var err error
	switch opt {
	case "history":
		h.History, err = intArg(d, opt, 1)
	case "history_bytes":
		h.HistoryBytes, err = sizeArg(d, opt)
	case "replay":
		h.Replay, err = intArg(d, opt, 0)
	case "keepalive":
		h.Keepalive, err = durationArg(d, opt, true)
	case "linger":
		h.Linger, err = durationArg(d, opt, true)
	case "write_timeout":
		h.WriteTimeout, err = durationArg(d, opt, false)
	case "status_wait":
		h.StatusWait, err = durationArg(d, opt, false)
	case "max_event_size":
		h.MaxEventSize, err = sizeArg(d, opt)
	case "max_clients":
		h.MaxClients, err = intArg(d, opt, 0)
	case "max_streams":
		if d.NextArg() && d.Val() == "off" {
			h.MaxStreams = -1
			return noMoreArgs(d, opt)
		}
		d.Prev()
		h.MaxStreams, err = intArg(d, opt, 1)
	case "retry":
		h.Retry, err = durationArg(d, opt, false)
	case "upstream_idle_timeout":
		h.UpstreamIdleTimeout, err = durationArg(d, opt, false)
	case "drain":
		h.Drain, err = durationArg(d, opt, false)
	case "client_send_buffer":
		if d.NextArg() && d.Val() == "off" {
			h.ClientSendBuffer = -1
			return noMoreArgs(d, opt)
		}
		d.Prev()
		h.ClientSendBuffer, err = sizeArg(d, opt)
	case "vary":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.Errf("vary: needs at least one request header name")
		}
		for _, name := range args {
			if strings.ContainsAny(name, "{}: ") {
				return d.Errf("vary: %q is not a header name", name)
			}
			h.Vary = append(h.Vary, http.CanonicalHeaderKey(name))
		}
	case "header_up":
		return h.unmarshalHeaderUp(d)
	case "transport":
		return h.unmarshalTransport(d)
	default:
		return d.Errf("unrecognized sse_fanout option %q", opt)
	}
	return err
}

// unmarshalHeaderUp parses `header_up [+|-]<field> [<value>]` the way
// reverse_proxy does, refusing request placeholders (see HeaderUp).
func (h *Handler) unmarshalHeaderUp(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) < 1 || len(args) > 2 {
		return d.Errf("header_up: expected '[+|-]<field> [<value>]', got %d arguments", len(args))
	}
	for _, a := range args {
		if p := requestPlaceholder(a); p != "" {
			return d.Errf("header_up %s: placeholder %s depends on the request, but one upstream request serves many clients; use 'vary <header>' to forward a client's header (only {env.*}, {file.*} and {system.*} are allowed here)", args[0], p)
		}
	}
	if h.HeaderUp == nil {
		h.HeaderUp = new(headers.HeaderOps)
	}
	value := ""
	if len(args) == 2 {
		value = args[1]
	} else if !strings.HasPrefix(args[0], "-") {
		return d.Errf("header_up %s: missing value (use '-%s' to remove the field)", args[0], args[0])
	}
	if err := headers.CaddyfileHeaderOp(h.HeaderUp, args[0], value, nil); err != nil {
		return d.Errf("header_up: %v", err)
	}
	return nil
}

// unmarshalTransport parses a `transport http { ... }` block with Caddy's
// own reverse_proxy transport parser.
func (h *Handler) unmarshalTransport(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	name := d.Val()
	if name != "http" {
		return d.Errf("transport: only 'http' is supported, got %q", name)
	}
	unm, err := caddyfile.UnmarshalModule(d, "http.reverse_proxy.transport."+name)
	if err != nil {
		return err
	}
	raw := caddyconfig.JSONModuleObject(unm, "protocol", name, nil)
	var probe struct {
		ProxyProtocol string `json:"proxy_protocol"`
	}
	if err := json.Unmarshal(raw, &probe); err == nil && probe.ProxyProtocol != "" {
		return d.Errf("transport: proxy_protocol is not supported: a shared upstream connection carries no single client's address")
	}
	h.TransportRaw = raw
	return nil
}

// checkCaddyfile runs the load-time checks while the tokens are at hand,
// so that a bad value is reported with its file and line.
func (h *Handler) checkCaddyfile(d *caddyfile.Dispenser) error {
	eff := h.withDefaults()
	if err := eff.Validate(); err != nil {
		return d.Errf("%v", err)
	}
	return nil
}

func intArg(d *caddyfile.Dispenser, opt string, minimum int) (int, error) {
	if !d.NextArg() {
		return 0, d.Errf("%s: missing value", opt)
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n < minimum {
		return 0, d.Errf("%s: %q is not a whole number >= %d", opt, d.Val(), minimum)
	}
	return n, noMoreArgs(d, opt)
}

func sizeArg(d *caddyfile.Dispenser, opt string) (int64, error) {
	if !d.NextArg() {
		return 0, d.Errf("%s: missing size", opt)
	}
	n, err := humanize.ParseBytes(d.Val())
	if err != nil || n == 0 || n > 1<<40 {
		return 0, d.Errf("%s: %q is not a size like 64KiB or 16MiB", opt, d.Val())
	}
	return int64(n), noMoreArgs(d, opt)
}

// durationArg parses a duration; with allowOff, "off" is stored as -1
// (turned off), since zero means the default.
func durationArg(d *caddyfile.Dispenser, opt string, allowOff bool) (caddy.Duration, error) {
	if !d.NextArg() {
		return 0, d.Errf("%s: missing duration", opt)
	}
	if allowOff && d.Val() == "off" {
		return -1, noMoreArgs(d, opt)
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil || dur <= 0 {
		return 0, d.Errf("%s: %q is not a positive duration like 500ms or 15s", opt, d.Val())
	}
	return caddy.Duration(dur), noMoreArgs(d, opt)
}

func noMoreArgs(d *caddyfile.Dispenser, opt string) error {
	if d.NextArg() {
		return d.Errf("%s: unexpected extra argument %q", opt, d.Val())
	}
	return nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
