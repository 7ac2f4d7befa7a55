package demoorigin

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// parseCaddyfile builds an Origin from a sse_demo_origin directive.
func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	o := new(Origin)
	err := o.UnmarshalCaddyfile(h.Dispenser)
	return o, err
}

// UnmarshalCaddyfile sets up the origin from Caddyfile tokens. Syntax:
//
//	sse_demo_origin [<matcher>] {
//	    interval <duration>
//	    backlog  <n>
//	}
//
// The block is optional; the options are described on Origin's fields.
func (o *Origin) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.Errf("sse_demo_origin: unexpected argument %q; options go in a block", d.Val())
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("%s: specified more than once", opt)
		}
		seen[opt] = true
		if !d.NextArg() {
			return d.ArgErr()
		}
		switch opt {
		case "interval":
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil || dur <= 0 {
				return d.Errf("interval: want a positive duration such as 500ms, got %q", d.Val())
			}
			o.Interval = caddy.Duration(dur)
		case "backlog":
			n, err := strconv.Atoi(d.Val())
			if err != nil || n < 1 {
				return d.Errf("backlog: want a number of events of at least 1, got %q", d.Val())
			}
			o.Backlog = n
		default:
			return d.Errf("unrecognized option %q; sse_demo_origin takes interval and backlog", opt)
		}
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	return nil
}
