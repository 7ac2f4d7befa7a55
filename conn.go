package ssefanout

import (
	"context"
	"crypto/tls"
	"net"
	"reflect"
	"sync"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// connKey is the request context key under which a server's connections
// are remembered, so that a client's stream can reach its socket: to size
// its send buffer, and to write to it directly on the fast path.
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

// socket is a client connection's TCP socket, as far as it could be
// reached through the wrappers around it.
type socket struct {
	tcp *net.TCPConn
	// plain is true when every byte written to tcp reaches the client as
	// it is: no TLS, and only wrappers known to leave writes alone.
	plain bool
}

// socketOf looks through the wrappers of the request's connection (TLS,
// Caddy's protocol checks, the PROXY protocol) for its TCP socket.
// Wrappers that follow Go's conventions are passed through NetConn or Raw;
// Caddy's own, which have neither, through their embedded Conn.
func socketOf(ctx context.Context) socket {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	plain := true
	for range 8 { // wrappers never nest deeper
		switch v := c.(type) {
		case nil:
			return socket{}
		case *net.TCPConn:
			return socket{tcp: v, plain: plain}
		case *tls.Conn:
			plain = false
			c = v.NetConn()
		case interface{ Raw() net.Conn }: // the PROXY protocol: reads only
			c = v.Raw()
		case interface{ NetConn() net.Conn }:
			// a wrapper that may change what is written (as TLS does)
			plain = false
			c = v.NetConn()
		default:
			inner, writesThrough := embeddedConn(c)
			plain = plain && writesThrough
			c = inner
		}
	}
	return socket{}
}

// writeThroughWrappers are Caddy's connection wrappers, which only look at
// what is read (the HTTP/2 preface) or hide TLS state: what is written
// passes through them unchanged.
var writeThroughWrappers = map[string]bool{
	"*caddyhttp.http2Conn":   true,
	"caddyhttp.tlsStateConn": true,
}

// embeddedConn returns the net.Conn a wrapper embeds as its field Conn, and
// whether the wrapper is one known to write through unchanged.
func embeddedConn(c net.Conn) (net.Conn, bool) {
	v := reflect.ValueOf(c)
	typ := v.Type().String()
	if v.Kind() == reflect.Pointer {
		v = v.Elem()
	}
	if v.Kind() != reflect.Struct {
		return nil, false
	}
	f := v.FieldByName("Conn")
	if !f.IsValid() || !f.CanInterface() {
		return nil, false
	}
	inner, _ := f.Interface().(net.Conn)
	return inner, writeThroughWrappers[typ]
}

// setSendBuffer sets the kernel send buffer of the request's connection.
func setSendBuffer(ctx context.Context, size int) {
	if s := socketOf(ctx); s.tcp != nil {
		_ = s.tcp.SetWriteBuffer(size)
	}
}
