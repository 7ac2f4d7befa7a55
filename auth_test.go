package ssefanout

import (
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// authService answers forward_auth checks: 200 for the tokens it holds,
// 401 for any other; tokens can be revoked while clients are connected.
type authService struct {
	mu     sync.Mutex
	valid  map[string]bool
	checks int
	URL    string
}

func newAuthService(t *testing.T, tokens ...string) *authService {
	a := &authService{valid: map[string]bool{}}
	for _, tok := range tokens {
		a.valid[tok] = true
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.checks++
		ok := a.valid[strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")]
		a.mu.Unlock()
		if !ok {
			http.Error(w, "revoked or unknown token", http.StatusUnauthorized)
			return
		}
		w.WriteHeader(http.StatusOK)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	a.URL = ln.Addr().String()
	return a
}

func (a *authService) revoke(tok string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.valid, tok)
}

// The origin checks a vary credential only when its upstream opens, so a
// revoked token would still join a live per-user stream; forward_auth in
// front checks every request: the revoked token is refused while the
// stream stays up for its valid clients.
func TestForwardAuthRefusesRevokedToken(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	auth := newAuthService(t, "alice", "bob")
	base := startCaddy(t, `forward_auth `+auth.URL+` {
		uri /check
	}
	sse_fanout `+o.URL+` {
		vary Authorization
		linger 5s
	}`)
	alice := connect(t, base+"/feed", http.Header{"Authorization": {"Bearer alice"}})
	bob := connect(t, base+"/feed", http.Header{"Authorization": {"Bearer bob"}})
	eventually(t, 5*time.Second, func() bool { return o.open("/feed") == 2 }, func() string { return "per-user upstreams not open" })
	if alice.resp.StatusCode != 200 || bob.resp.StatusCode != 200 {
		t.Fatalf("valid tokens refused: %d %d", alice.resp.StatusCode, bob.resp.StatusCode)
	}

	auth.revoke("alice")
	// a new client with the revoked token is refused before sse_fanout,
	// though alice's stream is live and would otherwise take it
	req := mustRequest(t, base+"/feed")
	req.Header.Set("Authorization", "Bearer alice")
	resp, err := sharedTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("revoked token: status %d, want 401 from forward_auth", resp.StatusCode)
	}
	// valid clients keep their streams, and still join them
	bob2 := connect(t, base+"/feed", http.Header{"Authorization": {"Bearer bob"}})
	if bob2.resp.StatusCode != 200 {
		t.Fatalf("valid token refused after a revocation: %d", bob2.resp.StatusCode)
	}
	if n := o.open("/feed"); n != 2 {
		t.Errorf("origin holds %d upstreams, want alice's and bob's", n)
	}
	o.send("/feed", ev(1, "still live"))
	for _, c := range []*sseClient{alice, bob, bob2} {
		c.waitFor(t, ev(1, "still live"), 5*time.Second)
	}
}
