package ssefanout

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/headers"
)

var update = flag.Bool("update", false, "rewrite golden files")

func TestUnmarshalCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`sse_fanout http://127.0.0.1:3000/events {
		history 50
		history_bytes 2MiB
		replay 5
		keepalive 10s
		linger off
		write_timeout 3s
		status_wait 1s
		max_event_size 64KiB
		max_clients 100
		max_streams off
		retry 2500ms
		vary authorization X-Tenant
		vary Cookie
		header_up Host origin.internal
		header_up X-Api-Key {env.API_KEY}
		header_up -X-Remove
		upstream_idle_timeout 1m
		drain 2s
		client_send_buffer 64KiB
		transport http {
			dial_timeout 2s
		}
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"upstream", h.Upstream, "http://127.0.0.1:3000/events"},
		{"history", h.History, 50},
		{"history_bytes", h.HistoryBytes, int64(2 << 20)},
		{"replay", h.Replay, 5},
		{"keepalive", h.Keepalive, caddy.Duration(10 * time.Second)},
		{"linger", h.Linger, caddy.Duration(-1)},
		{"write_timeout", h.WriteTimeout, caddy.Duration(3 * time.Second)},
		{"status_wait", h.StatusWait, caddy.Duration(time.Second)},
		{"max_event_size", h.MaxEventSize, int64(64 << 10)},
		{"max_clients", h.MaxClients, 100},
		{"max_streams", h.MaxStreams, -1},
		{"retry", h.Retry, caddy.Duration(2500 * time.Millisecond)},
		{"vary", strings.Join(h.Vary, ","), "Authorization,X-Tenant,Cookie"},
		{"header_up host", h.HeaderUp.Set.Get("Host"), "origin.internal"},
		{"header_up env", h.HeaderUp.Set.Get("X-Api-Key"), "{env.API_KEY}"},
		{"header_up delete", strings.Join(h.HeaderUp.Delete, ","), "X-Remove"},
		{"upstream_idle_timeout", h.UpstreamIdleTimeout, caddy.Duration(time.Minute)},
		{"drain", h.Drain, caddy.Duration(2 * time.Second)},
		{"client_send_buffer", h.ClientSendBuffer, int64(64 << 10)},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	var tr map[string]any
	if err := json.Unmarshal(h.TransportRaw, &tr); err != nil || tr["protocol"] != "http" || tr["dial_timeout"] != float64(2*time.Second) {
		t.Errorf("transport = %s (%v)", h.TransportRaw, err)
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	cases := []struct {
		name, input, want string
	}{
		{"missing upstream", "sse_fanout", "missing upstream"},
		{"extra argument", "sse_fanout http://a b", `unexpected argument "b"`},
		{"relative upstream", "sse_fanout /events", "absolute URL"},
		{"bad scheme", "sse_fanout ftp://a", "scheme must be http or https"},
		{"request placeholder in host", "sse_fanout http://{http.request.host}/x", "scheme or host"},
		{"unknown option", "sse_fanout http://a {\n bogus 1\n}", `unrecognized sse_fanout option "bogus"`},
		{"bad duration", "sse_fanout http://a {\n keepalive soon\n}", `keepalive: "soon" is not a positive duration`},
		{"negative duration", "sse_fanout http://a {\n linger -1s\n}", "linger"},
		{"missing value", "sse_fanout http://a {\n history\n}", "history: missing value"},
		{"history zero", "sse_fanout http://a {\n history 0\n}", "history"},
		{"history words", "sse_fanout http://a {\n history lots\n}", `history: "lots" is not a whole number`},
		{"bad size", "sse_fanout http://a {\n max_event_size huge\n}", "max_event_size"},
		{"extra arg", "sse_fanout http://a {\n replay 1 2\n}", `replay: unexpected extra argument "2"`},
		{"duplicate", "sse_fanout http://a {\n replay 1\n replay 2\n}", "replay: specified more than once"},
		{"replay over history", "sse_fanout http://a {\n history 10\n replay 11\n}", "replay: must be between 0 and history"},
		{"history_bytes under max_event_size", "sse_fanout http://a {\n history_bytes 1KiB\n max_event_size 1MiB\n}", "history_bytes (1024) must hold one largest event"},
		{"request placeholder in header_up", "sse_fanout http://a {\n header_up X-User {http.request.header.X-User}\n}", "forward the client's header with 'vary X-User'"},
		{"header_up without value", "sse_fanout http://a {\n header_up X-A\n}", "missing value"},
		{"vary without names", "sse_fanout http://a {\n vary\n}", "vary: needs at least one"},
		{"transport other", "sse_fanout http://a {\n transport fastcgi\n}", `only the "http" protocol is supported`},
		{"bad send buffer", "sse_fanout http://a {\n client_send_buffer lots\n}", "client_send_buffer"},
		{"proxy protocol", "sse_fanout http://a {\n transport http {\n proxy_protocol v2\n }\n}", "proxy_protocol is not supported"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("no error for %q", tc.input)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Fatalf("error %q does not name the file and line", err)
			}
		})
	}
}

// A check involving two options, or an option inside the transport block,
// reports the line of the option that has to change, not the block's end;
// and every message says what to do.
func TestCaddyfileErrorsNameTheLineToChange(t *testing.T) {
	cases := []struct {
		name, input, want, line string
	}{
		{"history_bytes under max_event_size", "sse_fanout http://a {\n history 5\n history_bytes 1KiB\n max_event_size 1MiB\n}", "raise history_bytes or lower max_event_size", "Testfile:3"},
		{"max_event_size over the default history_bytes", "sse_fanout http://a {\n history 5\n max_event_size 32MiB\n}", "must hold one largest event", "Testfile:3"},
		{"replay over history", "sse_fanout http://a {\n replay 11\n keepalive 5s\n history 10\n}", "replay: must be between 0 and history", "Testfile:2"},
		{"replay over the default history", "sse_fanout http://a {\n keepalive 5s\n replay 1001\n}", "replay: must be between 0 and history", "Testfile:3"},
		{"proxy_protocol in transport", "sse_fanout http://a {\n history 5\n transport http {\n  dial_timeout 1s\n  proxy_protocol v2\n }\n}", "proxy_protocol is not supported", "Testfile:5"},
		{"vary Host", "sse_fanout http://a {\n history 5\n vary Authorization Host\n}", "use 'header_up Host <value>'", "Testfile:3"},
		{"vary Last-Event-ID", "sse_fanout http://a {\n vary last-event-id\n}", "cannot split streams", "Testfile:2"},
		{"keepalive 0", "sse_fanout http://a {\n keepalive 0\n}", "use 'off' to turn it off", "Testfile:2"},
		{"linger 0s", "sse_fanout http://a {\n history 5\n linger 0s\n}", "use 'off' to turn it off", "Testfile:3"},
		{"max_streams 0", "sse_fanout http://a {\n max_streams 0\n}", "use 'off' to turn it off", "Testfile:2"},
		{"client_send_buffer 0", "sse_fanout http://a {\n client_send_buffer 0\n}", "use 'off' to turn it off", "Testfile:2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("no error for %q", tc.input)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.HasSuffix(err.Error(), ", at "+tc.line) {
				t.Fatalf("error %q, want one containing %q at %s", err, tc.want, tc.line)
			}
		})
	}
}

// Two handlers of one identity in one config must agree on the hub
// settings; the load error names the setting, both values and the fix.
func TestConflictingSettingsAreNamed(t *testing.T) {
	src := `{
	admin off
	auto_https off
	persist_config off
}
http://127.0.0.1:1 {
	handle /a/* {
		sse_fanout http://127.0.0.1:2 {
			history 10
		}
	}
}
http://127.0.0.1:3 {
	sse_fanout http://127.0.0.1:2 {
		history 20
	}
}
`
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	cfg, _, err := adapter.Adapt([]byte(src), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatal(err)
	}
	err = caddy.Validate(&c)
	if err == nil {
		t.Fatal("two handlers sharing streams with different history validated")
	}
	// the servers are provisioned in either order
	for _, want := range []string{"http://127.0.0.1:2", "in servers srv", "srv0", "srv1", "sets history ", "10", "20", "give both the same history"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestCaddyfileErrorLine checks that a bad option in a whole Caddyfile is
// reported with the line it is on.
func TestCaddyfileErrorLine(t *testing.T) {
	src := "http://127.0.0.1:1 {\n\tsse_fanout http://127.0.0.1:2 {\n\t\thistory 5\n\t\tkeepalive nope\n\t}\n}\n"
	adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
	_, _, err := adapter.Adapt([]byte(src), map[string]any{"filename": "Caddyfile"})
	if err == nil || !strings.Contains(err.Error(), "Caddyfile:4") || !strings.Contains(err.Error(), "keepalive") {
		t.Fatalf("error %v should name Caddyfile:4 and keepalive", err)
	}
}

// TestAdaptGolden adapts every testdata/caddyfile/*.caddyfiletest (a
// Caddyfile, a line of dashes, the expected JSON) as `caddy adapt` would.
func TestAdaptGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/caddyfile/*.caddyfiletest")
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			src, want, ok := strings.Cut(string(raw), "\n----------\n")
			if !ok {
				t.Fatalf("%s: no ---------- separator", f)
			}
			adapter := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}
			got, warns, err := adapter.Adapt([]byte(src+"\n"), nil)
			if err != nil {
				t.Fatalf("adapt: %v", err)
			}
			if len(warns) > 0 {
				t.Fatalf("warnings: %v", warns)
			}
			var pretty strings.Builder
			enc := json.NewEncoder(&pretty)
			enc.SetIndent("", "\t")
			var v any
			_ = json.Unmarshal(got, &v)
			_ = enc.Encode(v)
			if *update {
				_ = os.WriteFile(f, []byte(src+"\n----------\n"+pretty.String()), 0o644)
				return
			}
			if pretty.String() != want {
				t.Fatalf("adapted JSON differs from %s:\n%s", f, pretty.String())
			}
		})
	}
}

func TestValidate(t *testing.T) {
	ok := Handler{Upstream: "http://a"}.withDefaults()
	if err := ok.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	if ok.History != 1000 || ok.HistoryBytes != 16<<20 || ok.Keepalive != caddy.Duration(15*time.Second) ||
		ok.Linger != caddy.Duration(30*time.Second) || ok.WriteTimeout != caddy.Duration(30*time.Second) ||
		ok.StatusWait != caddy.Duration(5*time.Second) || ok.MaxEventSize != 1<<20 || ok.MaxStreams != 1000 {
		t.Fatalf("unexpected defaults: %+v", ok)
	}
	bad := []Handler{
		{},
		{Upstream: "http://a", History: -1},
		{Upstream: "http://a", HistoryBytes: 10, MaxEventSize: 20},
		{Upstream: "http://a", History: 3, Replay: 4},
		{Upstream: "http://a", MaxClients: -1},
		{Upstream: "http://a", Vary: []string{"Host"}},
		{Upstream: "http://a", TransportRaw: json.RawMessage(`{"protocol":"fastcgi","root":"/x"}`)},
		{Upstream: "http://a", TransportRaw: json.RawMessage(`{"protocol":"http","proxy_protocol":"v1"}`)},
		{Upstream: "http://a", HeaderUp: &headers.HeaderOps{Set: http.Header{"X-User": {"{http.request.header.X-User}"}}}},
	}
	for _, h := range bad {
		h := h.withDefaults()
		if err := h.Validate(); err == nil {
			t.Errorf("%+v validated", h)
		}
	}
}

// Every Caddyfile in the README adapts: whole ones as they are, fragments
// inside a site block. The syntax summary (with <placeholders>) is left
// out.
func TestReadmeCaddyfilesAdapt(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```caddyfile\n(.*?)```").FindAllStringSubmatch(string(readme), -1)
	if len(blocks) < 10 {
		t.Fatalf("found %d Caddyfile blocks in the README", len(blocks))
	}
	adapt := func(src string) error {
		_, _, err := caddyfile.Adapter{ServerType: httpcaddyfile.ServerType{}}.Adapt([]byte(src), map[string]any{"filename": "README"})
		return err
	}
	checked := 0
	for _, b := range blocks {
		src := b[1]
		if strings.Contains(src, "<upstream-base-url>") {
			continue
		}
		checked++
		if err := adapt(src); err != nil {
			if err2 := adapt("example.com {\n" + src + "\n}\n"); err2 != nil {
				t.Errorf("a README Caddyfile does not adapt, whole (%v) or in a site block (%v):\n%s", err, err2, src)
			}
		}
	}
	t.Logf("%d README Caddyfiles adapt", checked)
}

// Configurations that would do nothing or fail deep inside Caddy are
// refused when Caddy loads them, through the Caddyfile and through JSON,
// with a message that says what to do, and a running config is kept.
func TestMisleadingConfigsRefusedAtLoad(t *testing.T) {
	leakCheck(t)
	o := newOrigin(t)
	port := freePort(t)
	base := startCaddy(t, "sse_fanout "+o.URL)
	c := connect(t, base+"/kept", nil)
	o.waitOpen(t, "/kept", 1, 5*time.Second)

	err := tryLoadCaddyfile(caddyfileFor(port, "sse_fanout "+o.URL+" {\n\t\thistory 5\n\t\tvary Host\n\t}"))
	if err == nil || !strings.Contains(err.Error(), "use 'header_up Host <value>'") || !strings.Contains(err.Error(), "Caddyfile:") {
		t.Fatalf("vary Host in a Caddyfile: %v, want a refusal pointing to header_up Host at its line", err)
	}
	for _, tc := range []struct{ handler, want string }{
		{`{"handler": "sse_fanout", "upstream": "` + o.URL + `", "vary": ["Host"]}`, "use 'header_up Host <value>'"},
		{`{"handler": "sse_fanout", "upstream": "` + o.URL + `", "transport": {"protocol": "fastcgi", "root": "/srv"}}`, `transport: only the "http" protocol is supported, got "fastcgi"`},
	} {
		cfg := fmt.Sprintf(`{"admin": {"disabled": true}, "apps": {"http": {"servers": {"s": {
			"listen": ["127.0.0.1:%d"], "automatic_https": {"disable": true},
			"routes": [{"handle": [%s]}]}}}}}`, port, tc.handler)
		if err := caddy.Load([]byte(cfg), true); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("JSON %s: %v, want an error containing %q", tc.handler, err, tc.want)
		}
	}
	// the running config still serves its stream
	o.send("/kept", ev(1, "still here"))
	c.waitFor(t, ev(1, "still here"), 5*time.Second)
}
