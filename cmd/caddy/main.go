// Command caddy is Caddy with the standard modules, the sse_fanout handler
// and the demo SSE origin (sse_demo_origin) plugged in, so that the demo
// runs without xcaddy:
//
//	go run ./cmd/caddy run --config Caddyfile.example
//
// To build a Caddy for production, use xcaddy instead:
//
//	xcaddy build --with github.com/sse-fanout/caddy-sse-fanout
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// plug in Caddy modules here
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/sse-fanout/caddy-sse-fanout"
	_ "github.com/sse-fanout/caddy-sse-fanout/cmd/caddy/internal/demoorigin"
)

func main() {
	caddycmd.Main()
}
