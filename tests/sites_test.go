package tests

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/quic-go/quic-go/http3"
)

// What the protocol tests share: a Caddy whose sites a test writes whole
// (HTTPS ones with certificates from Caddy's internal CA, kept in a temp
// dir), clients for HTTP/1.1, HTTP/2 and HTTP/3 that trust that CA, and a
// reader of the events a client receives.

// caddySites is a Caddy in this process serving the sites a test wrote.
type caddySites struct {
	*caddyServer
	// storage is Caddy's storage: the internal CA and its certificates.
	storage string
}

// startCaddySites loads sites (site blocks of a Caddyfile) after global
// options that put the admin API on a fresh port, Caddy's storage in a
// temp dir, and have HTTPS sites use the internal CA (`local_certs`)
// without installing its root anywhere or redirecting from port 80.
// Like startCaddy, it checks at cleanup that the module's gauges return
// to zero once a config without the tested handlers is loaded (with the
// same storage), then stops Caddy.
func startCaddySites(t *testing.T, sites string) *caddySites {
	t.Helper()
	p := freePorts(t, 2)
	c := &caddySites{caddyServer: &caddyServer{port: p[0], adminPort: p[1]}, storage: t.TempDir()}
	c.Admin = fmt.Sprintf("http://127.0.0.1:%d", c.adminPort)
	c.reload(t, sites)
	t.Cleanup(func() {
		c.reload(t, fmt.Sprintf(`http://127.0.0.1:%d {
	bind 127.0.0.1
	handle /never-requested {
		sse_fanout http://127.0.0.1:9
	}
}`, c.port))
		c.waitGaugesZero(t)
		_ = caddy.Stop()
	})
	return c
}

// reload loads sites as the whole config again: a reload.
func (c *caddySites) reload(t *testing.T, sites string) {
	t.Helper()
	cfg := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	grace_period 2s
	storage file_system %s
	skip_install_trust
	local_certs
	auto_https disable_redirects
}
%s
`, c.adminPort, c.storage, sites)
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	js, _, err := adapter.Adapt([]byte(cfg), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting the Caddyfile: %v\n%s", err, cfg)
	}
	if err := caddy.Load(js, true); err != nil {
		t.Fatalf("loading the Caddyfile: %v\n%s", err, cfg)
	}
}

// roots is a pool holding the internal CA's root, read from Caddy's
// storage.
func (c *caddySites) roots(t *testing.T) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(c.storage, "pki", "authorities", "local", "root.crt"))
	if err != nil {
		t.Fatalf("reading the internal CA's root: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		t.Fatal("the internal CA's root.crt holds no certificate")
	}
	return pool
}

// waitCertificate waits until the HTTPS site at host:port presents a
// certificate that the internal CA's root verifies (Caddy issues it just
// after the config loads), and returns the certificate.
func (c *caddySites) waitCertificate(t *testing.T, hostPort string) *x509.Certificate {
	t.Helper()
	conf := &tls.Config{RootCAs: c.roots(t)}
	var leaf *x509.Certificate
	var last error
	eventually(t, 10*time.Second, func() bool {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", hostPort, conf)
		if last = err; err != nil {
			return false
		}
		defer conn.Close()
		leaf = conn.ConnectionState().PeerCertificates[0]
		return true
	}, func() string { return fmt.Sprintf("no verified TLS handshake with %s: %v", hostPort, last) })
	return leaf
}

// spkiHash is the base64 SHA-256 of a certificate's public key, as
// Chromium's --ignore-certificate-errors-spki-list takes it.
func spkiHash(cert *x509.Certificate) string {
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// httpClients are clients of one protocol each; their connections close at
// test cleanup.
type httpClients struct {
	h1, h2, h3, plain http.RoundTripper
}

// newHTTPClients makes clients that trust roots: HTTP/1.1 over TLS (ALPN
// offers only http/1.1), HTTP/2 over TLS, HTTP/3 over QUIC, and plaintext
// HTTP/1.1. None asks for compression on its own.
func newHTTPClients(t *testing.T, roots *x509.CertPool) httpClients {
	t.Helper()
	h1 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, NextProtos: []string{"http/1.1"}}, DisableCompression: true}
	h2 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true, DisableCompression: true}
	h3 := &http3.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, DisableCompression: true}
	plain := &http.Transport{DisableCompression: true}
	t.Cleanup(func() {
		h1.CloseIdleConnections()
		h2.CloseIdleConnections()
		plain.CloseIdleConnections()
		_ = h3.Close()
	})
	return httpClients{h1: h1, h2: h2, h3: h3, plain: plain}
}

// sseEvent is a dispatched event as an EventSource sees it: its data and
// the last event id in force.
type sseEvent struct{ ID, Data string }

// eventStream is one client's open stream.
type eventStream struct {
	Resp   *http.Response
	r      *bufio.Reader
	id     string
	cancel context.CancelFunc
}

// openStream sends an EventSource-like GET (Accept: text/event-stream,
// plus hdr) through rt; the request is cancelled at test cleanup, or
// after a minute at the latest. It fails the test on a transport error;
// any status is returned.
func openStream(t *testing.T, rt http.RoundTripper, url string, hdr http.Header) *eventStream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := rt.RoundTrip(req)
	if err != nil {
		cancel()
		t.Fatalf("GET %s: %v", url, err)
	}
	s := &eventStream{Resp: resp, r: bufio.NewReader(resp.Body), cancel: cancel}
	t.Cleanup(s.close)
	return s
}

// close ends the stream from the client's side.
func (s *eventStream) close() {
	s.cancel()
	_ = s.Resp.Body.Close()
}

// next returns the next dispatched event, parsing the id and data fields
// the way EventSource does for the simple streams of these tests: a block
// without data (an id-only block, a comment) dispatches nothing. It fails
// the test if none arrives within d.
func (s *eventStream) next(t *testing.T, d time.Duration) sseEvent {
	t.Helper()
	type result struct {
		ev  sseEvent
		err error
	}
	done := make(chan result, 1)
	go func() {
		var data []string
		for {
			line, err := s.r.ReadString('\n')
			if err != nil {
				done <- result{err: err}
				return
			}
			line = strings.TrimSuffix(line, "\n")
			field, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			switch {
			case line == "" && data != nil:
				done <- result{ev: sseEvent{ID: s.id, Data: strings.Join(data, "\n")}}
				return
			case field == "id":
				s.id = value
			case field == "data":
				data = append(data, value)
			}
		}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("%s stream: reading the next event: %v", s.Resp.Proto, r.err)
		}
		return r.ev
	case <-time.After(d):
		s.close() // ends the reader
		t.Fatalf("%s stream: no event within %v", s.Resp.Proto, d)
		return sseEvent{}
	}
}

// published returns how many entries the one stream the admin API lists
// has published.
func (c *caddySites) published() (uint64, error) {
	resp, err := http.Get(c.Admin + "/sse_fanout/streams")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var hubs []struct {
		Streams []streamView `json:"streams"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&hubs); err != nil {
		return 0, err
	}
	if len(hubs) != 1 || len(hubs[0].Streams) != 1 {
		return 0, fmt.Errorf("admin API lists %+v, want one hub with one stream", hubs)
	}
	return hubs[0].Streams[0].Published, nil
}

// sendToHistory has the origin send events on path while no client is
// attached, and waits until the stream's history holds them all: clients
// that come back get them from the history.
func (c *caddySites) sendToHistory(t *testing.T, o *origin, path string, events ...string) {
	t.Helper()
	var before, now uint64
	var err error
	eventually(t, 10*time.Second, func() bool { before, err = c.published(); return err == nil }, func() string { return err.Error() })
	for _, e := range events {
		o.send(path, e)
	}
	eventually(t, 10*time.Second, func() bool {
		now, err = c.published()
		return err == nil && now == before+uint64(len(events))
	}, func() string {
		return fmt.Sprintf("the stream published %d entries of %d sent (%v)", now-before, len(events), err)
	})
	if got, err := c.metrics("caddy_sse_fanout_clients"); err != nil || got["caddy_sse_fanout_clients"] != 0 {
		t.Fatalf("clients came back before the events were in the history (%v, %v): the test does not exercise a resume", got, err)
	}
}
