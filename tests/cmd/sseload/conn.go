package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sse-fanout/caddy-sse-fanout/tests/internal/rawsse"
	"golang.org/x/net/http2"
)

// h2Transport makes the HTTP/2 client connections, one per client.
var h2Transport = &http2.Transport{}

// client runs one SSE client until ctx ends or its stream does. attempts
// is marked done once its connection attempt succeeded or failed. With a
// poller, the client's stream is handed to it and client returns at once.
// A counting client's events are only counted (eventParser.countSeqs).
func (l *load) client(ctx context.Context, src net.IP, sem chan struct{}, attempts *sync.WaitGroup, pl *poller, res *clientResult, counting bool) {
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		l.fail(errors.New("run ended before connecting"))
		attempts.Done()
		return
	}
	s, err := l.open(ctx, src)
	<-sem
	if err != nil {
		l.fail(err)
		attempts.Done()
		return
	}
	res.connected = true
	parser := &eventParser{l: l, res: res, counting: counting}
	if pl != nil {
		err := pl.add(s.(*rawStream), parser)
		attempts.Done()
		if err != nil {
			l.endedEarly(res, err)
		}
		return
	}
	attempts.Done()
	bs := s.(*bodyStream)
	stop := context.AfterFunc(ctx, bs.close)
	defer stop()
	defer bs.close()
	err = readBody(bs.body, parser)
	if ctx.Err() == nil {
		l.endedEarly(res, err)
	}
}

// open connects and reads the response head. The result is a *rawStream
// for the poller or a *bodyStream.
func (l *load) open(ctx context.Context, src net.IP) (any, error) {
	conn, err := l.dial(ctx, src)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(l.opts.connectTimeout))
	var s any
	switch {
	case l.usesPoller():
		s, err = l.openRaw(conn)
	case l.opts.url.Scheme == "http":
		s, err = l.openH1(conn)
	case l.opts.http2:
		s, err = l.openH2(ctx, conn)
	default:
		s, err = l.openTLS(ctx, conn)
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

func (l *load) dial(ctx context.Context, src net.IP) (net.Conn, error) {
	d := net.Dialer{Timeout: l.opts.connectTimeout}
	if l.opts.sources > 1 {
		d.LocalAddr = &net.TCPAddr{IP: src}
	}
	return d.DialContext(ctx, "tcp", l.opts.url.Host)
}

// bodyStream is a response body read by its own goroutine.
type bodyStream struct {
	body  io.Reader
	close func()
}

// openH1 sends the request on conn (plain or TLS) and reads the head.
func (l *load) openH1(conn net.Conn) (*bodyStream, error) {
	resp, _, err := l.request1(conn)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	return &bodyStream{body: resp.Body, close: func() { _ = conn.Close() }}, nil
}

// request1 writes the HTTP/1.1 request and reads and checks the response
// head. The bufio.Reader holds what was read past the head.
func (l *load) request1(conn net.Conn) (*http.Response, *bufio.Reader, error) {
	if _, err := conn.Write(l.request); err != nil {
		return nil, nil, err
	}
	br := bufio.NewReaderSize(conn, 4096)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, nil, err
	}
	if err := checkHead(resp); err != nil {
		return nil, nil, err
	}
	return resp, br, nil
}

func checkHead(resp *http.Response) error {
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %s", resp.Status)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		return fmt.Errorf("content type %q", ct)
	}
	return nil
}

func (l *load) tlsConfig(proto string) *tls.Config {
	return &tls.Config{
		ServerName:         l.opts.url.Hostname(),
		InsecureSkipVerify: true, // a loopback benchmark: the server's certificate is not checked
		NextProtos:         []string{proto},
	}
}

// openTLS is openH1 over TLS.
func (l *load) openTLS(ctx context.Context, conn net.Conn) (*bodyStream, error) {
	tc := tls.Client(conn, l.tlsConfig("http/1.1"))
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("tls handshake: %w", err)
	}
	return l.openH1(tc)
}

// openH2 makes an HTTP/2 connection over TLS and starts the one stream.
func (l *load) openH2(ctx context.Context, conn net.Conn) (*bodyStream, error) {
	tc := tls.Client(conn, l.tlsConfig("h2"))
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("tls handshake: %w", err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		return nil, fmt.Errorf("server did not agree to HTTP/2 (ALPN %q)", p)
	}
	cc, err := h2Transport.NewClientConn(tc)
	if err != nil {
		return nil, fmt.Errorf("http2: %w", err)
	}
	req, err := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodGet, l.opts.url.String(), nil)
	if err != nil {
		cc.Close()
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	req.Header.Set("User-Agent", "sseload")
	resp, err := cc.RoundTrip(req)
	if err == nil {
		err = checkHead(resp)
	}
	if err != nil {
		cc.Close()
		return nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	return &bodyStream{body: resp.Body, close: func() { _ = cc.Close() }}, nil
}

// readBody reads a stream body until it ends.
func readBody(body io.Reader, p *eventParser) error {
	buf := make([]byte, 4096)
	for {
		n, err := body.Read(buf)
		if n > 0 {
			if perr := p.feed(buf[:n], time.Now()); perr != nil {
				return perr
			}
		}
		if err != nil {
			return err
		}
	}
}

// rawStream is a plain HTTP/1.1 stream after its head, as a bare
// non-blocking file descriptor for the poller.
type rawStream struct {
	fd      int
	chunked bool
	head    []byte    // body bytes read along with the head
	at      time.Time // when head was read
}

// openRaw reads the head with net/http's parser, then takes the socket out
// of Go's network poller: it duplicates the descriptor and closes the
// net.Conn (the socket stays open through the duplicate).
func (l *load) openRaw(conn net.Conn) (*rawStream, error) {
	resp, br, err := l.request1(conn)
	if err != nil {
		return nil, err
	}
	at := time.Now()
	head, _ := br.Peek(br.Buffered())
	s := &rawStream{
		chunked: slices.Contains(resp.TransferEncoding, "chunked"),
		head:    slices.Clone(head),
		at:      at,
	}
	if s.fd, err = rawsse.Detach(conn); err != nil {
		return nil, err
	}
	conn.Close()
	return s, nil
}
