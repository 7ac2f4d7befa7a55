package ssefanout

import (
	"context"
	"net"
	"sync"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// connKey is the request context key under which a server's connections
// are remembered, so that a stream can size its connection's send buffer.
type connKey struct{}

// connServers are the servers that already put their connections in the
// request context; each needs it once, however many handlers it has.
var connServers sync.Map

// rememberConns makes srv put every connection in its requests' context.
// Servers live as long as their config, so the set only ever holds the
// servers of configs that were loaded; they are few.
func rememberConns(srv *caddyhttp.Server) {
	if _, loaded := connServers.LoadOrStore(srv, true); loaded {
		return
	}
	srv.RegisterConnContext(func(ctx context.Context, c net.Conn) context.Context {
		return context.WithValue(ctx, connKey{}, c)
	})
}

// forgetConns drops a server that is going away.
func forgetConns(srv *caddyhttp.Server) { connServers.Delete(srv) }

// setSendBuffer sets the kernel send buffer of the request's connection,
// looking through TLS and listener wrappers for the TCP connection.
func setSendBuffer(ctx context.Context, size int) {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	for c != nil {
		if b, ok := c.(interface{ SetWriteBuffer(int) error }); ok {
			_ = b.SetWriteBuffer(size)
			return
		}
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return
		}
		c = u.NetConn()
	}
}
