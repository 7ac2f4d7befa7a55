package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// checkBlocks fails unless braces balance and every nginx directive ends
// in ';'.
func checkBlocks(t *testing.T, conf string, nginx bool) {
	t.Helper()
	depth := 0
	for i, line := range strings.Split(conf, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		depth += strings.Count(line, "{") - strings.Count(line, "}")
		if depth < 0 {
			t.Fatalf("line %d: '}' without its '{'\n%s", i+1, conf)
		}
		if nginx && !strings.HasSuffix(line, ";") && !strings.HasSuffix(line, "{") && line != "}" {
			t.Errorf("line %d: directive without ';': %q", i+1, line)
		}
	}
	if depth != 0 {
		t.Errorf("%d unclosed blocks\n%s", depth, conf)
	}
}

func TestNginxConfig(t *testing.T) {
	dir := t.TempDir()
	for _, module := range []string{"/some/where/ngx_nchan_module.so", ""} {
		c := nginxConfig{Dir: dir, Port: 40001, OriginPort: 40002, NchanModule: module, MaxFiles: 12345}
		b, err := c.render()
		if err != nil {
			t.Fatal(err)
		}
		conf := string(b)
		checkBlocks(t, conf, true)
		for _, want := range []string{
			"daemon off;", "worker_processes 1;",
			fmt.Sprintf("pid %s/nginx.pid;", dir),
			fmt.Sprintf("error_log %s/", dir),
			fmt.Sprintf("listen 127.0.0.1:%d", c.Port),
			fmt.Sprintf("worker_connections %d;", c.Connections()),
			fmt.Sprintf("worker_rlimit_nofile %d;", c.MaxFiles),
		} {
			if !strings.Contains(conf, want) {
				t.Errorf("module %q: no %q in\n%s", module, want, conf)
			}
		}
		for _, line := range strings.Split(conf, "\n") {
			if f := strings.Fields(line); len(f) == 2 && strings.HasSuffix(f[0], "_temp_path") && !strings.HasPrefix(f[1], dir) {
				t.Errorf("a temp path outside the run's directory: %q", line)
			}
		}
		nchan := []string{"load_module " + module + ";", "nchan_subscriber eventsource;", "location = " + nchanPublish, "location = " + nchanSubscribe, "nchan_publisher;"}
		proxy := []string{fmt.Sprintf("proxy_pass http://127.0.0.1:%d;", c.OriginPort), "proxy_buffering off;"}
		want, notWant := proxy, nchan
		if module != "" {
			want, notWant = nchan, proxy
		}
		for _, w := range want {
			if !strings.Contains(conf, w) {
				t.Errorf("module %q: no %q in\n%s", module, w, conf)
			}
		}
		for _, w := range notWant {
			if strings.Contains(conf, w) {
				t.Errorf("module %q: %q should not be in\n%s", module, w, conf)
			}
		}
		nginxSyntaxCheck(t, dir, c)
	}
}

// nginxSyntaxCheck runs nginx -t on the configuration where nginx (and
// nchan, for its variant) is installed; elsewhere it does nothing.
func nginxSyntaxCheck(t *testing.T, dir string, c nginxConfig) {
	nginx, err := exec.LookPath("nginx")
	if err != nil {
		nginx = "/usr/sbin/nginx"
	}
	if _, err := os.Stat(nginx); err != nil {
		return
	}
	if c.NchanModule != "" {
		c.NchanModule = "/usr/lib/nginx/modules/ngx_nchan_module.so"
		if _, err := os.Stat(c.NchanModule); err != nil {
			return
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := c.render()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(file, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(nginx, "-t", "-q", "-p", dir, "-c", file, "-e", filepath.Join(dir, "error.log")).CombinedOutput()
	if err != nil {
		t.Errorf("nginx -t: %v\n%s", err, out)
	}
}

func TestCaddyConfig(t *testing.T) {
	storage := t.TempDir()
	for _, peer := range []string{peerFanout, peerReverseProxy, peerFanoutStatus} {
		for _, tls := range []bool{false, true} {
			c := caddyConfig{Port: 40011, OriginPort: 40012, Peer: peer, TLS: tls, Storage: storage}
			b, err := c.render()
			if err != nil {
				t.Fatal(err)
			}
			conf := string(b)
			checkBlocks(t, conf, false)
			scheme := "http"
			if tls {
				scheme = "https"
			}
			want := []string{fmt.Sprintf("%s://127.0.0.1:%d {", scheme, c.Port), "bind 127.0.0.1", "admin off"}
			if peer == peerFanout || peer == peerFanoutStatus {
				want = append(want, fmt.Sprintf("sse_fanout http://127.0.0.1:%d\n", c.OriginPort))
			} else {
				want = append(want, fmt.Sprintf("reverse_proxy 127.0.0.1:%d {", c.OriginPort), "flush_interval -1")
			}
			if tls {
				want = append(want, "tls internal", "storage file_system "+storage, "protocols h1 h2")
			}
			for _, w := range want {
				if !strings.Contains(conf, w) {
					t.Errorf("%s tls=%v: no %q in\n%s", peer, tls, w, conf)
				}
			}
			// the status page's handle block comes first: sse_fanout
			// without a matcher would take /status too if it came first
			// in the Caddyfile's directive order
			if hasStatus := strings.Contains(conf, "handle /status {\n\t\tsse_fanout_status\n\t}"); hasStatus != (peer == peerFanoutStatus) {
				t.Errorf("%s tls=%v: status page mounted %v in\n%s", peer, tls, hasStatus, conf)
			}
			if !tls && strings.Contains(conf, "tls internal") {
				t.Errorf("%s without TLS has tls internal:\n%s", peer, conf)
			}
		}
	}
	if _, err := (caddyConfig{Peer: peerNchan}).render(); err == nil {
		t.Error("a Caddyfile for nchan: no error")
	}
	if _, err := (caddyConfig{Peer: peerFanout, TLS: true, Storage: "relative"}).render(); err == nil {
		t.Error("TLS with a relative storage path: no error")
	}
}

func TestMissingPeersSayWhatToInstall(t *testing.T) {
	cfg := &config{nginx: filepath.Join(t.TempDir(), "no-nginx"), nchanModule: "/no/such/module.so"}
	missing := missingPeers(cfg)
	for _, p := range []string{peerNchan, peerNginx} {
		if !strings.Contains(missing[p], "apt-get install -y nginx-light libnginx-mod-nchan") {
			t.Errorf("no nginx: %s says %q", p, missing[p])
		}
	}
	sh, err := exec.LookPath("sh") // stands in for an nginx that is there
	if err != nil {
		t.Skip("no sh:", err)
	}
	cfg = &config{nginx: sh, nchanModule: "/no/such/module.so"}
	missing = missingPeers(cfg)
	if missing[peerNginx] != "" || missing[peerNchan] == "" || cfg.nginx != sh {
		t.Errorf("nginx without nchan: %v, nginx %q", missing, cfg.nginx)
	}
}
