package ssefanout

import (
	"errors"
	"fmt"
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
	httpcaddyfile.RegisterHandlerDirective("sse_fanout_status", parseStatusCaddyfile)
	httpcaddyfile.RegisterHandlerDirective("sse_fanout", parseCaddyfile)
	// Both answer the request, like reverse_proxy: they run at the same
	// point, so that no global order option is needed. Each is put right
	// before reverse_proxy, so the one registered first comes first:
	// the status page, mounted on a path of its own, wins over a
	// catch-all sse_fanout.
	httpcaddyfile.RegisterDirectiveOrder("sse_fanout_status", httpcaddyfile.Before, "reverse_proxy")
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
//	    catch_up              off
//	    max_catch_ups         <n>|off
//	    catch_up_timeout      <duration>
//	    catch_up_events       <n>
//	    assign_ids
//	    replay_since          <duration>
//	    cluster nats <url...> {
//	        name        <name>
//	        credentials <file>
//	        tls_ca      <file>
//	        tls_cert    <file>
//	        tls_key     <file>
//	        lease       <duration>
//	        replicas    <n>
//	        max_age     <duration>
//	        max_bytes   <size>
//	        fallback    off
//	    }
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
	// where each option was set, so that a check involving two options
	// reports the line of the one to change
	at := map[string]caddyfile.Token{}
	for d.NextBlock(0) {
		opt := d.Val()
		if _, seen := at[opt]; seen && opt != "header_up" && opt != "vary" {
			return d.Errf("%s: specified more than once", opt)
		}
		at[opt] = d.Token()
		if err := h.unmarshalOption(d, opt); err != nil {
			return err
		}
	}
	return h.checkCaddyfile(d, at)
}

// unmarshalOption parses one option line of the block.
func (h *Handler) unmarshalOption(d *caddyfile.Dispenser, opt string) error {
	var err error
	switch opt {
	case "history":
		h.History, err = intArg(d, opt, 1, false)
	case "history_bytes":
		h.HistoryBytes, err = sizeArg(d, opt, false)
	case "replay":
		h.Replay, err = intArg(d, opt, 0, false)
	case "keepalive":
		h.Keepalive, err = durationArg(d, opt, true)
	case "linger":
		h.Linger, err = durationArg(d, opt, true)
	case "write_timeout":
		h.WriteTimeout, err = durationArg(d, opt, false)
	case "status_wait":
		h.StatusWait, err = durationArg(d, opt, false)
	case "max_event_size":
		h.MaxEventSize, err = sizeArg(d, opt, false)
	case "max_clients":
		h.MaxClients, err = intArg(d, opt, 0, false)
	case "max_streams":
		h.MaxStreams, err = intArg(d, opt, 1, true)
	case "retry":
		h.Retry, err = durationArg(d, opt, false)
	case "upstream_idle_timeout":
		h.UpstreamIdleTimeout, err = durationArg(d, opt, false)
	case "drain":
		h.Drain, err = durationArg(d, opt, false)
	case "client_send_buffer":
		h.ClientSendBuffer, err = sizeArg(d, opt, true)
	case "catch_up":
		if !d.NextArg() || d.Val() != "off" {
			return d.Errf("catch_up: the only value is 'off' (catch-ups are on by default; max_catch_ups sets how many)")
		}
		h.MaxCatchUps = -1
		return noMoreArgs(d, opt)
	case "max_catch_ups":
		h.MaxCatchUps, err = intArg(d, opt, 1, true)
	case "catch_up_timeout":
		h.CatchUpTimeout, err = durationArg(d, opt, false)
	case "catch_up_events":
		h.CatchUpEvents, err = intArg(d, opt, 1, false)
	case "assign_ids":
		h.AssignIDs = true
		return noMoreArgs(d, opt)
	case "replay_since":
		h.ReplaySince, err = durationArg(d, opt, false)
	case "vary":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.Errf("vary: needs at least one request header name")
		}
		for _, name := range args {
			if err := checkVaryName(name); err != nil {
				return d.Errf("%v", err)
			}
			h.Vary = append(h.Vary, http.CanonicalHeaderKey(name))
		}
	case "header_up":
		return h.unmarshalHeaderUp(d)
	case "transport":
		return h.unmarshalTransport(d)
	case "cluster":
		return h.unmarshalCluster(d)
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
	value := ""
	if len(args) == 2 {
		value = args[1]
	} else if !strings.HasPrefix(args[0], "-") {
		return d.Errf("header_up %s: missing value (use '-%s' to remove the field)", args[0], args[0])
	}
	if err := checkHeaderUp(strings.TrimLeft(args[0], "+-"), value); err != nil {
		return d.Errf("%v", err)
	}
	if h.HeaderUp == nil {
		h.HeaderUp = new(headers.HeaderOps)
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
		return d.Errf("transport: only the \"http\" protocol is supported, got %q", name)
	}
	// the block's own tokens, to find the line of an option it refuses
	seg := d.NewFromNextSegment()
	var refused *caddyfile.Token
	for seg.Next() {
		if seg.Val() == "proxy_protocol" && refused == nil {
			tok := seg.Token()
			refused = &tok
		}
	}
	seg.Reset()
	mod, err := caddy.GetModule("http.reverse_proxy.transport." + name)
	if err != nil {
		return d.Errf("transport %s: %v", name, err)
	}
	unm, ok := mod.New().(caddyfile.Unmarshaler)
	if !ok {
		return d.Errf("transport %s cannot be configured from a Caddyfile", name)
	}
	if err := unm.UnmarshalCaddyfile(seg); err != nil {
		return err
	}
	raw := caddyconfig.JSONModuleObject(unm, "protocol", name, nil)
	if err := checkTransport(raw); err != nil {
		if refused != nil {
			return errAt(*refused, err)
		}
		return d.Errf("%v", err)
	}
	h.TransportRaw = raw
	return nil
}

// unmarshalCluster parses `cluster nats <url...> { ... }`.
func (h *Handler) unmarshalCluster(d *caddyfile.Dispenser) error {
	if !d.NextArg() || d.Val() != "nats" {
		return d.Errf("cluster: the only engine is NATS JetStream: 'cluster nats <url...> { ... }'")
	}
	n := &NATSConfig{URLs: d.RemainingArgs()}
	if len(n.URLs) == 0 {
		return d.Errf("cluster nats: at least one NATS URL is required, e.g. nats://127.0.0.1:4222")
	}
	// each option's token, and the URLs' under "", for errors at the line
	// of the option to change
	at := map[string]caddyfile.Token{"": d.Token()}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if _, seen := at[opt]; seen {
			return d.Errf("cluster %s: specified more than once", opt)
		}
		at[opt] = d.Token()
		var err error
		switch opt {
		case "name", "credentials", "tls_ca", "tls_cert", "tls_key":
			if !d.NextArg() {
				return d.Errf("cluster %s: missing value", opt)
			}
			v := d.Val()
			*map[string]*string{"name": &n.Name, "credentials": &n.Credentials, "tls_ca": &n.TLSCA, "tls_cert": &n.TLSCert, "tls_key": &n.TLSKey}[opt] = v
			err = noMoreArgs(d, "cluster "+opt)
		case "lease":
			n.Lease, err = durationArg(d, "cluster lease", false)
		case "max_age":
			n.MaxAge, err = durationArg(d, "cluster max_age", false)
		case "replicas":
			n.Replicas, err = intArg(d, "cluster replicas", 1, false)
		case "max_bytes":
			n.MaxBytes, err = sizeArg(d, "cluster max_bytes", false)
		case "fallback":
			if !d.NextArg() || d.Val() != "off" {
				return d.Errf("cluster fallback: the only value is 'off' (the fall-back is on by default)")
			}
			n.NoFallback = true
			err = noMoreArgs(d, "cluster fallback")
		default:
			return d.Errf("unrecognized cluster option %q", opt)
		}
		if err != nil {
			return err
		}
	}
	check := *n
	check.setDefaults()
	if opt, err := check.problem(); err != nil {
		return errAt(at[opt], err)
	}
	h.Cluster = &ClusterConfig{NATS: n}
	return nil
}

// checkCaddyfile runs the load-time checks while the tokens are at hand,
// so that a bad value is reported with its file and the line of the option
// that has to change.
func (h *Handler) checkCaddyfile(d *caddyfile.Dispenser, at map[string]caddyfile.Token) error {
	if _, off := at["catch_up"]; off {
		if tok, both := at["max_catch_ups"]; both {
			return errAt(tok, errors.New("max_catch_ups: catch-ups are turned off by 'catch_up off'; keep one of the two"))
		}
	}
	eff := h.withDefaults()
	err := eff.Validate()
	if err == nil {
		return nil
	}
	var oe *optionError
	if errors.As(err, &oe) {
		for _, opt := range oe.options {
			if tok, ok := at[opt]; ok {
				return errAt(tok, err)
			}
		}
	}
	return d.Errf("%v", err)
}

// errAt reports err at a token's file and line, as Caddy's own Errf
// reports it at the current token.
func errAt(tok caddyfile.Token, err error) error {
	return fmt.Errorf("%w, at %s:%d", err, tok.File, tok.Line)
}

// intArg parses a whole number of at least minimum; with allowOff, "off"
// is stored as -1 (zero means the default).
func intArg(d *caddyfile.Dispenser, opt string, minimum int, allowOff bool) (int, error) {
	if !d.NextArg() {
		return 0, d.Errf("%s: missing value", opt)
	}
	if allowOff && d.Val() == "off" {
		return -1, noMoreArgs(d, opt)
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n < minimum {
		return 0, d.Errf("%s: %q is not a whole number >= %d%s", opt, d.Val(), minimum, offHint(allowOff))
	}
	return n, noMoreArgs(d, opt)
}

// sizeArg parses a positive size like 64KiB; with allowOff, "off" is
// stored as -1.
func sizeArg(d *caddyfile.Dispenser, opt string, allowOff bool) (int64, error) {
	if !d.NextArg() {
		return 0, d.Errf("%s: missing size", opt)
	}
	if allowOff && d.Val() == "off" {
		return -1, noMoreArgs(d, opt)
	}
	n, err := humanize.ParseBytes(d.Val())
	if err != nil || n == 0 || n > 1<<40 {
		return 0, d.Errf("%s: %q is not a size like 64KiB or 16MiB%s", opt, d.Val(), offHint(allowOff))
	}
	return int64(n), noMoreArgs(d, opt)
}

// durationArg parses a positive duration; with allowOff, "off" is stored
// as -1 (zero means the default).
func durationArg(d *caddyfile.Dispenser, opt string, allowOff bool) (caddy.Duration, error) {
	if !d.NextArg() {
		return 0, d.Errf("%s: missing duration", opt)
	}
	if allowOff && d.Val() == "off" {
		return -1, noMoreArgs(d, opt)
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil || dur <= 0 {
		return 0, d.Errf("%s: %q is not a positive duration like 500ms or 15s%s", opt, d.Val(), offHint(allowOff))
	}
	return caddy.Duration(dur), noMoreArgs(d, opt)
}

// offHint tells how to turn an option off, for options that can be.
func offHint(allowOff bool) string {
	if allowOff {
		return "; use 'off' to turn it off"
	}
	return ""
}

func noMoreArgs(d *caddyfile.Dispenser, opt string) error {
	if d.NextArg() {
		return d.Errf("%s: unexpected extra argument %q", opt, d.Val())
	}
	return nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
