package ssefanout

import (
	"errors"
	"hash/fnv"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// Table tests of what a request maps to; the end-to-end tests in
// isolation_test.go and hostile_client_test.go check the same through a
// real Caddy.

// requestWith returns a GET for target with a replacer that knows the
// given placeholder values, as Caddy's would.
func requestWith(target string, values map[string]string) (*http.Request, *caddy.Replacer) {
	r := httptest.NewRequest(http.MethodGet, "http://proxy.test"+target, nil)
	repl := caddy.NewReplacer()
	for k, v := range values {
		repl.Set(k, v)
	}
	return r, repl
}

func TestParseUpstream(t *testing.T) {
	t.Setenv("SSE_TEST_HOST", "origin.internal:8443")
	t.Setenv("SSE_TEST_PREFIX", "/api/v1")
	cases := []struct {
		raw     string
		wantErr string
		check   func(*upstreamTemplate) bool
	}{
		{raw: "http://127.0.0.1:3000", check: func(u *upstreamTemplate) bool { return u.host == "127.0.0.1:3000" && !u.dynamic }},
		{raw: "https://{env.SSE_TEST_HOST}/x", check: func(u *upstreamTemplate) bool { return u.scheme == "https" && u.host == "origin.internal:8443" }},
		// load-time placeholders are resolved once, unescaped
		{raw: "http://a/svc{env.SSE_TEST_PREFIX}/events", check: func(u *upstreamTemplate) bool {
			return !u.dynamic && joinLiterals(u.path) == "/svc/api/v1/events"
		}},
		{raw: "http://a/t/{http.request.header.X-Tenant}/e", check: func(u *upstreamTemplate) bool {
			return u.dynamic && len(u.path) == 3 && u.path[1].name == "http.request.header.X-Tenant"
		}},
		{raw: `http://a/lit\{x\}`, check: func(u *upstreamTemplate) bool { return !u.dynamic && joinLiterals(u.path) == "/lit{x}" }},
		{raw: "http://a/?scope=public&tenant={http.request.header.X-Tenant}", check: func(u *upstreamTemplate) bool {
			return u.fixed["scope"] && u.fixed["tenant"] && len(u.fixed) == 2
		}},
		{raw: "a/b", wantErr: "absolute URL"},
		{raw: "ftp://a", wantErr: "scheme must be http or https"},
		{raw: "http://{http.request.host}/x", wantErr: "scheme or host"},
		{raw: "http://user:pw@a/x", wantErr: "no user info"},
		{raw: "http://a/?{http.request.header.X}=1", wantErr: "not in parameter names"},
		{raw: "http://a/{unclosed", wantErr: "unclosed placeholder"},
		{raw: "http://a/%zz", wantErr: "bad path"},
	}
	for _, tc := range cases {
		u, err := parseUpstream(tc.raw)
		switch {
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%s: error %v, want one containing %q", tc.raw, err, tc.wantErr)
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s: %v", tc.raw, err)
		case tc.wantErr == "" && !tc.check(u):
			t.Errorf("%s: unexpected template %+v", tc.raw, u)
		}
	}
}

func TestBuild(t *testing.T) {
	tenant := map[string]string{"http.request.header.X-Tenant": "acme"}
	cases := []struct {
		upstream, target string
		values           map[string]string
		want             string   // the upstream URL
		expansions       []string // what the placeholders expanded to
		refused          string   // the 400's public line, if refused
	}{
		{upstream: "http://o/base", target: "/a/b?x=1", want: "http://o/base/a/b?x=1"},
		{upstream: "http://o/base/", target: "/a", want: "http://o/base/a"},
		{upstream: "http://o/base?k=v", target: "/a?x=1", want: "http://o/base/a?k=v&x=1"},
		{upstream: "http://o", target: "/a?lastEventId=5&x=1", want: "http://o/a?x=1"},
		{upstream: "http://o", target: "/a?last%45ventId=5", want: "http://o/a"},
		{upstream: "http://o", target: "/a%2Fb", want: "http://o/a%2Fb"},
		// placeholders in the path: one segment each, never empty
		{upstream: "http://o/t/{http.request.header.X-Tenant}", target: "/events", values: tenant, want: "http://o/t/acme/events", expansions: []string{"acme"}},
		{upstream: "http://o/t/{http.request.header.X-Tenant}", target: "/events", values: map[string]string{"http.request.header.X-Tenant": "acme/x"}, want: "http://o/t/acme%2Fx/events", expansions: []string{"acme/x"}},
		{upstream: "http://o/t/{http.request.header.X-Tenant}", target: "/acme/events", refused: "a value the upstream path needs is missing"},
		{upstream: "http://o/t/{http.request.header.X-Tenant}", target: "/e", values: map[string]string{"http.request.header.X-Tenant": ".."}, refused: "dot-segment"},
		{upstream: "http://o/t/{http.request.header.X-Tenant}", target: "/e", values: map[string]string{"http.request.header.X-Tenant": "a;b"}, want: "http://o/t/a%3Bb/e", expansions: []string{"a;b"}},
		// placeholders in the query: escaped values; fixed names win
		{upstream: "http://o/?tenant={http.request.header.X-Tenant}&scope=public", target: "/", values: map[string]string{"http.request.header.X-Tenant": "acme#&scope=admin"}, want: "http://o/?tenant=acme%23%26scope%3Dadmin&scope=public", expansions: []string{"acme#&scope=admin"}},
		{upstream: "http://o/?tenant={http.request.header.X-Tenant}", target: "/", want: "http://o/?tenant=", expansions: []string{""}},
		{upstream: "http://o/?room={http.request.uri.query.room}", target: "/feed?room=r1&x=2", values: map[string]string{"http.request.uri.query.room": "r1"}, want: "http://o/feed?room=r1&x=2", expansions: []string{"r1"}},
		{upstream: "http://o/?scope=public", target: "/?scope=admin&Scope=x", want: "http://o/?scope=public&Scope=x"},
		// paths a server could read as a parent directory
		{upstream: "http://o/base", target: "/..;/admin", refused: "dot-segment"},
		{upstream: "http://o/base", target: "/.;x/admin", refused: "dot-segment"},
		{upstream: "http://o/base", target: "/..%00/admin", refused: "control character"},
		{upstream: "http://o/base", target: "/%2e%2e/admin", refused: "dot-segment"},
		{upstream: "http://o/base", target: "/..foo", refused: "dot-segment"},
		{upstream: "http://o/base", target: "/a%5cb", refused: "backslash"},
		{upstream: "http://o/base", target: "/a%7Fb", refused: "control character"},
		{upstream: "http://o/base", target: "/a..b/.c/c..", want: "http://o/base/a..b/.c/c.."},
		{upstream: "http://o/base", target: "/a?x=%01", want: "http://o/base/a?x=%01"},
	}
	for _, tc := range cases {
		tmpl, err := parseUpstream(tc.upstream)
		if err != nil {
			t.Fatalf("%s: %v", tc.upstream, err)
		}
		r, repl := requestWith(tc.target, tc.values)
		u, expansions, err := tmpl.build(r, repl)
		name := tc.upstream + " + " + tc.target
		if tc.refused != "" {
			var br *badRequest
			if err == nil || !errors.As(err, &br) || !strings.Contains(br.public, tc.refused) {
				t.Errorf("%s: got %v, %v; want a 400 saying %q", name, u, err, tc.refused)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if u.String() != tc.want {
			t.Errorf("%s: %s, want %s", name, u, tc.want)
		}
		if strings.Join(expansions, "|") != strings.Join(tc.expansions, "|") {
			t.Errorf("%s: expansions %q, want %q", name, expansions, tc.expansions)
		}
	}
}

func TestStreamKeysKeepExpansionsApart(t *testing.T) {
	tmpl, err := parseUpstream("http://o/t/{http.request.header.A}-{http.request.header.B}")
	if err != nil {
		t.Fatal(err)
	}
	key := func(a, b string) string {
		r, repl := requestWith("/e", map[string]string{"http.request.header.A": a, "http.request.header.B": b})
		u, exp, err := tmpl.build(r, repl)
		if err != nil {
			t.Fatal(err)
		}
		return streamKey(u.String(), exp, nil, nil)
	}
	// both expand to /t/a-b-c/e, yet they are two streams
	if k1, k2 := key("a-b", "c"), key("a", "b-c"); k1 == k2 {
		t.Fatalf("two pairs of placeholder values share the key %q", k1)
	}
	if streamKey("http://o/x", nil, nil, nil) != "http://o/x" {
		t.Fatal("with no placeholder and no vary, the key is the URL")
	}
	if streamKey("http://o/x", []string{""}, nil, nil) == "http://o/x" {
		t.Fatal("an expansion must be part of the key, even an empty one")
	}
}

func TestClientLastID(t *testing.T) {
	cases := []struct {
		target string
		header []string
		want   lastID
	}{
		{target: "/", want: lastID{}},
		{target: "/", header: []string{"7"}, want: lastID{id: "7", set: true}},
		{target: "/", header: []string{""}, want: lastID{id: "", set: true}},
		{target: "/", header: []string{"a", "b"}, want: lastID{id: "a", set: true}},
		{target: "/?lastEventId=9", want: lastID{id: "9", set: true}},
		{target: "/?lastEventId=9", header: []string{"7"}, want: lastID{id: "7", set: true}},
		{target: "/?lastEventId=", want: lastID{id: "", set: true}},
		{target: "/?lastEventId=" + strings.Repeat("x", maxLastEventIDLen), want: lastID{id: strings.Repeat("x", maxLastEventIDLen), set: true}},
		{target: "/?lastEventId=" + strings.Repeat("x", maxLastEventIDLen+1), want: lastID{}},
		{target: "/?lastEventId=a%0Ab", want: lastID{}},
	}
	for _, tc := range cases {
		r, _ := requestWith(tc.target, nil)
		if tc.header != nil {
			r.Header["Last-Event-Id"] = tc.header
		}
		if got := clientLastID(r); got != tc.want {
			t.Errorf("%s %q: %+v, want %+v", tc.target, tc.header, got, tc.want)
		}
	}
}

func TestStreamKeyNeverCollides(t *testing.T) {
	vary := []string{"Authorization", "Cookie"}
	keys := map[string]string{}
	for name, hdr := range map[string]map[string][]string{
		"none":          {},
		"empty auth":    {"Authorization": {""}},
		"auth a":        {"Authorization": {"a"}},
		"auth a,b":      {"Authorization": {"a", "b"}},
		"auth ab":       {"Authorization": {"ab"}},
		"cookie a":      {"Cookie": {"a"}},
		"auth a cookie": {"Authorization": {"a"}, "Cookie": {""}},
	} {
		k := streamKey("http://o/x", nil, vary, hdr)
		if other, dup := keys[k]; dup {
			t.Fatalf("%q and %q share a key", name, other)
		}
		keys[k] = name
	}
	if streamKey("http://o/x", nil, nil, map[string][]string{"Authorization": {"a"}}) != "http://o/x" {
		t.Fatal("without vary, the key is the URL")
	}
}

// A stream's name, on the status page, in the admin view and in the logs,
// does not let a viewer confirm a guess of its path, query or vary values
// (a tenant's name, a user id): it is not a public function of the key,
// such as the unkeyed FNV-1a the names were.
func TestStreamNameNotComputableFromAGuessedKey(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	base := startCaddy(t, statusSite(o.URL, ""))
	connect(t, base+"/s/tenant-42", nil)
	s := findStream(t, "/base/tenant-42")
	rep := waitStatus(t, base+"/status", func(r statusReport) bool { return len(r.Shown) == 1 })
	guess := fnv.New64a()
	_, _ = guess.Write([]byte(s.key)) // the key as the code builds it from a guessed URL
	if shown := rep.Shown[0].Stream; shown == strconv.FormatUint(guess.Sum64(), 16) {
		t.Fatalf("the stream's name %s is the FNV-1a of its key: anyone can confirm a guessed tenant", shown)
	}
}
