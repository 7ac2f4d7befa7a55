package ssefanout

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Stopping a separately built Caddy (./cmd/caddy) with long-lived streams
// open: by default Caddy's grace period would wait for them forever.

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// caddyBinary builds ./cmd/caddy once per test binary.
func caddyBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ssefanout-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "caddy")
		out, err := exec.Command("go", "build", "-o", binPath, "./cmd/caddy").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("%v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("building ./cmd/caddy: %v", buildErr)
	}
	return binPath
}

func TestProcessStopEndsStreams(t *testing.T) {
	bin := caddyBinary(t)
	for _, how := range []string{"SIGTERM", "POST /stop"} {
		t.Run(how, func(t *testing.T) {
			o := newOrigin(t)
			port, admin := freePort(t), freePort(t)
			cfg := filepath.Join(t.TempDir(), "Caddyfile")
			src := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	auto_https off
	persist_config off
	grace_period 1m
}
http://127.0.0.1:%d {
	bind 127.0.0.1
	sse_fanout_status /status
	sse_fanout %s
}
`, admin, port, o.URL)
			if err := os.WriteFile(cfg, []byte(src), 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin, "run", "--config", cfg, "--adapter", "caddyfile")
			cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "XDG_DATA_HOME="+t.TempDir(), "XDG_CONFIG_HOME="+t.TempDir())
			var stderr lockedBuffer
			cmd.Stderr = &stderr
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("caddy's output:\n%s", truncate(stderr.String(), 4000))
				}
			})
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan struct{})
			go func() { _ = cmd.Wait(); close(exited) }()
			t.Cleanup(func() {
				select {
				case <-exited:
				default:
					_ = cmd.Process.Kill()
					<-exited
				}
			})
			base := fmt.Sprintf("http://127.0.0.1:%d", port)
			waitUp(t, base)

			const n = 100
			rt := newClientTransport()
			defer rt.CloseIdleConnections()
			var clients []*sseClient
			for range n {
				c, err := tryConnect(rt, base+"/live", nil)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(c.close)
				clients = append(clients, c)
			}
			// a status page viewer: its stream must end too
			status, err := tryConnect(rt, base+"/status", nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(status.close)
			clients = append(clients, status)
			o.waitOpen(t, "/live", 1, 5*time.Second)
			o.send("/live", ev(1, "hello"))
			for _, c := range clients[:n] {
				c.waitFor(t, ev(1, "hello"), 10*time.Second)
			}
			status.waitFor(t, `"clients":100`, 10*time.Second)

			// a busy stream: clients with events pending must see the stop too
			pub := startPublisher(o, "/live", time.Millisecond)
			defer pub.halt()
			start := time.Now()
			if how == "SIGTERM" {
				if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
					t.Fatal(err)
				}
			} else {
				resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/stop", admin), "", nil)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
			}
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				t.Fatalf("caddy did not exit within 10s of %s with %d streams open", how, n)
			}
			took := time.Since(start)
			for i, c := range clients {
				c.waitEnded(t, 5*time.Second)
				if !c.cleanEnd() {
					t.Fatalf("client %d: stream did not end cleanly: %v", i, c.err)
				}
			}
			t.Logf("%s: exited after %v, all %d streams and the status page's ended cleanly", how, took.Round(time.Millisecond), n)
		})
	}
}

// lockedBuffer is a bytes.Buffer that a process's output and a test can
// use at once.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
