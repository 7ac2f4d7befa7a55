package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// Real processes for the cluster tests: NATS servers and Caddy nodes,
// started and stopped by the tests, by PID, bounded in time.

// natsServerBin finds nats-server, which scripts/test installs with
// `GOTOOLCHAIN=local go install github.com/nats-io/nats-server/v2@v2.15.2`.
func natsServerBin(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("nats-server"); err == nil {
		return p
	}
	out, err := exec.Command("go", "env", "GOPATH").Output()
	if err == nil {
		p := filepath.Join(strings.TrimSpace(string(out)), "bin", "nats-server")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("the cluster tests need nats-server v2.15.x: run ./scripts/test, the README's test command, which installs it " +
		"(GOTOOLCHAIN=local go install github.com/nats-io/nats-server/v2@v2.15.2)")
	return ""
}

// proc is a process a test started; it is killed at test cleanup if it
// still runs.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *lockedBuffer
	done chan struct{}
}

// lockedBuffer keeps a process's output for the test's log.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 4<<20 {
		return len(p), nil
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startProc(t testing.TB, name string, bin string, args ...string) *proc {
	t.Helper()
	return startProcEnv(t, name, nil, bin, args...)
}

// startProcEnv starts a process with env added to the test's environment.
func startProcEnv(t testing.TB, name string, env []string, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), log: &lockedBuffer{}, done: make(chan struct{})}
	if env != nil {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("--- output of %s (last 12000 bytes, without the admin API's request lines):\n%s", name, tail(withoutAdminRequests(p.log.String()), 12000))
		}
	})
	return p
}

// withoutAdminRequests drops Caddy's log lines of admin API requests: the
// tests poll the admin API, and these lines would push out the ones that
// tell what happened.
func withoutAdminRequests(s string) string {
	lines := strings.SplitAfter(s, "\n")
	kept := lines[:0]
	for _, l := range lines {
		if !strings.Contains(l, `"logger":"admin.api","msg":"received request"`) {
			kept = append(kept, l)
		}
	}
	return strings.Join(kept, "")
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}

// signal sends sig to the process, if it still runs.
func (p *proc) signal(sig syscall.Signal) {
	if !p.exited() {
		_ = p.cmd.Process.Signal(sig)
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill ends the process at once and waits for it.
func (p *proc) kill() {
	p.signal(syscall.SIGCONT) // a stopped process cannot die otherwise
	p.signal(syscall.SIGKILL)
	<-p.done
}

// stop ends the process with SIGTERM, and SIGKILL after 10 s.
func (p *proc) stop() {
	p.signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

// natsCluster is three nats-server processes in one JetStream cluster on
// loopback, with file storage in the test's temporary folder.
type natsCluster struct {
	t     testing.TB
	bin   string
	dir   string
	nodes [3]*natsNode
}

type natsNode struct {
	name                   string
	client, route, monitor int
	conf                   string
	p                      *proc
}

func startNATSCluster(t testing.TB) *natsCluster {
	t.Helper()
	c := &natsCluster{t: t, bin: natsServerBin(t), dir: t.TempDir()}
	// nine distinct ports: two servers given the same one would leave a
	// cluster of two, where replicas 3 finds no place
	ports := freePorts(t, 3*len(c.nodes))
	for i := range c.nodes {
		c.nodes[i] = &natsNode{name: fmt.Sprintf("n%d", i+1), client: ports[3*i], route: ports[3*i+1], monitor: ports[3*i+2]}
	}
	for i, n := range c.nodes {
		var routes []string
		for j, o := range c.nodes {
			if j != i {
				routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", o.route))
			}
		}
		n.conf = filepath.Join(c.dir, n.name+".conf")
		conf := fmt.Sprintf(`server_name: %s
listen: 127.0.0.1:%d
http: 127.0.0.1:%d
jetstream {
  store_dir: %q
  sync_interval: always
  max_memory_store: 64MB
  max_file_store: 512MB
}
cluster {
  name: ssefanout-test
  listen: 127.0.0.1:%d
  routes: [%s]
}
`, n.name, n.client, n.monitor, filepath.Join(c.dir, n.name), n.route, strings.Join(routes, ", "))
		if err := os.WriteFile(n.conf, []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i := range c.nodes {
		c.start(i)
	}
	c.waitReady(30 * time.Second)
	return c
}

// start (re)starts node i, on its own store.
func (c *natsCluster) start(i int) {
	n := c.nodes[i]
	n.p = startProc(c.t, "nats "+n.name, c.bin, "-c", n.conf)
}

// urls are the client URLs of all three, comma-separated.
// serverOf returns the index of the NATS server that the Caddy node
// with the given node id is connected to, by the servers' /connz.
func (c *natsCluster) serverOf(t testing.TB, nodeID string) int {
	t.Helper()
	for i, n := range c.nodes {
		var connz struct {
			Connections []struct {
				Name string `json:"name"`
			} `json:"connections"`
		}
		if n.p.exited() || !getJSON(fmt.Sprintf("http://127.0.0.1:%d/connz", n.monitor), &connz) {
			continue
		}
		for _, conn := range connz.Connections {
			if strings.HasSuffix(conn.Name, " "+nodeID) {
				return i
			}
		}
	}
	t.Fatalf("no NATS server has a connection of node %s", nodeID)
	return -1
}

// moveLeader makes the NATS server at index i lead the stream, by asking
// its leader to step down in i's favour.
func (c *natsCluster) moveLeader(t testing.TB, stream string, i int) {
	t.Helper()
	if c.streamLeader(stream) == i {
		return
	}
	conn, err := nats.Connect(strings.ReplaceAll(c.urls(), " ", ","))
	if err != nil {
		t.Fatalf("connecting to NATS: %v", err)
	}
	defer conn.Close()
	req := fmt.Sprintf(`{"placement":{"preferred":%q}}`, c.nodes[i].name)
	if _, err := conn.Request("$JS.API.STREAM.LEADER.STEPDOWN."+stream, []byte(req), 5*time.Second); err != nil {
		t.Fatalf("asking %s's leader to step down: %v", stream, err)
	}
	eventually(t, 10*time.Second, func() bool { return c.streamLeader(stream) == i }, func() string {
		return fmt.Sprintf("%s did not move its leader to %s", stream, c.nodes[i].name)
	})
}

func (c *natsCluster) urls() string {
	var u []string
	for _, n := range c.nodes {
		u = append(u, fmt.Sprintf("nats://127.0.0.1:%d", n.client))
	}
	return strings.Join(u, " ")
}

// waitReady waits until the live nodes agree on a meta leader, each is
// healthy, and the leader sees every other live node as current: before
// that, creating a replicated stream fails.
func (c *natsCluster) waitReady(within time.Duration) {
	c.t.Helper()
	eventually(c.t, within, func() bool {
		leader := ""
		for _, n := range c.nodes {
			if n.p == nil || n.p.exited() {
				continue
			}
			var jsz struct {
				Meta *struct {
					Leader   string `json:"leader"`
					Replicas []struct {
						Name    string `json:"name"`
						Current bool   `json:"current"`
						Offline bool   `json:"offline"`
					} `json:"replicas"`
				} `json:"meta_cluster"`
			}
			if !getJSON(fmt.Sprintf("http://127.0.0.1:%d/jsz", n.monitor), &jsz) || jsz.Meta == nil || jsz.Meta.Leader == "" {
				return false
			}
			if leader != "" && leader != jsz.Meta.Leader {
				return false
			}
			leader = jsz.Meta.Leader
			var hz struct {
				Status string `json:"status"`
			}
			if !getJSON(fmt.Sprintf("http://127.0.0.1:%d/healthz", n.monitor), &hz) || hz.Status != "ok" {
				return false
			}
			if n.name == leader {
				for _, r := range jsz.Meta.Replicas {
					if c.alive(r.Name) && (!r.Current || r.Offline) {
						return false
					}
				}
			}
		}
		return leader != ""
	}, func() string { return "the NATS cluster did not become ready" })
}

func (c *natsCluster) alive(name string) bool {
	for _, n := range c.nodes {
		if n.name == name {
			return n.p != nil && !n.p.exited()
		}
	}
	return false
}

// jszStream is what a NATS server's monitoring endpoint says of one
// JetStream stream.
type jszStream struct {
	Name    string `json:"name"`
	Cluster struct {
		Leader string `json:"leader"`
	} `json:"cluster"`
	Config struct {
		MaxMsgsPerSubject int64 `json:"max_msgs_per_subject"`
	} `json:"config"`
}

// stream returns what the first live server that answers says of a
// JetStream stream, with its config.
func (c *natsCluster) stream(name string) (jszStream, bool) {
	for _, n := range c.nodes {
		if n.p == nil || n.p.exited() {
			continue
		}
		var jsz struct {
			Accounts []struct {
				Streams []jszStream `json:"stream_detail"`
			} `json:"account_details"`
		}
		if !getJSON(fmt.Sprintf("http://127.0.0.1:%d/jsz?streams=true&config=true", n.monitor), &jsz) {
			continue
		}
		for _, a := range jsz.Accounts {
			for _, s := range a.Streams {
				if s.Name == name && s.Cluster.Leader != "" {
					return s, true
				}
			}
		}
	}
	return jszStream{}, false
}

// streamLeader returns the index of the node that leads a JetStream
// stream, or -1.
func (c *natsCluster) streamLeader(stream string) int {
	if s, ok := c.stream(stream); ok {
		for j, o := range c.nodes {
			if o.name == s.Cluster.Leader {
				return j
			}
		}
	}
	return -1
}

// logMaxPerSubject returns the max_msgs_per_subject of a JetStream stream
// as the cluster reports it, or -1.
func (c *natsCluster) logMaxPerSubject(stream string) int64 {
	if s, ok := c.stream(stream); ok {
		return s.Config.MaxMsgsPerSubject
	}
	return -1
}

func getJSON(url string, v any) bool {
	client := http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return false
	}
	return json.Unmarshal(b, v) == nil
}

// caddyBin builds cmd/caddy with the race detector, once per test binary.
var caddyBuild struct {
	once sync.Once
	path string
	err  error
}

func caddyBinary(t testing.TB) string {
	t.Helper()
	caddyBuild.once.Do(func() {
		dir, err := os.MkdirTemp("", "ssefanout-caddy-*")
		if err != nil {
			caddyBuild.err = err
			return
		}
		caddyBuild.path = filepath.Join(dir, "caddy")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-race", "-o", caddyBuild.path, "github.com/sse-fanout/caddy-sse-fanout/cmd/caddy")
		if out, err := cmd.CombinedOutput(); err != nil {
			caddyBuild.err = fmt.Errorf("building cmd/caddy: %v\n%s", err, out)
		}
	})
	if caddyBuild.err != nil {
		t.Fatal(caddyBuild.err)
	}
	return caddyBuild.path
}

// caddyNode is a Caddy process with the module, serving one site.
type caddyNode struct {
	name        string
	port, admin int
	Base        string
	conf        string
	p           *proc
}

// startCaddyNode starts a Caddy process whose site on a fresh port holds
// body, with its admin API on another.
func startCaddyNode(t testing.TB, name, body string) *caddyNode {
	t.Helper()
	p := freePorts(t, 2)
	n := &caddyNode{name: name, port: p[0], admin: p[1]}
	n.Base = fmt.Sprintf("http://127.0.0.1:%d", n.port)
	n.conf = filepath.Join(t.TempDir(), "Caddyfile")
	conf := fmt.Sprintf(`{
	debug
	admin 127.0.0.1:%d
	auto_https off
	persist_config off
	grace_period 2s
	storage file_system %s
}
http://127.0.0.1:%d {
	bind 127.0.0.1
	%s
}
`, n.admin, filepath.Join(t.TempDir(), "storage"), n.port, body)
	if err := os.WriteFile(n.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	n.start(t)
	return n
}

func (n *caddyNode) start(t testing.TB) {
	n.p = startProc(t, "caddy "+n.name, caddyBinary(t), "run", "--config", n.conf, "--adapter", "caddyfile")
	waitListening(t, n.Base)
}

// rewrite replaces old with new in the node's Caddyfile, for its next start.
func (n *caddyNode) rewrite(t testing.TB, old, new string) {
	t.Helper()
	b, err := os.ReadFile(n.conf)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s's Caddyfile has no %q", n.name, old)
	}
	if err := os.WriteFile(n.conf, []byte(strings.Replace(string(b), old, new, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// metric reads one metric of the node, summed over its labels.
// nodeIDOf returns the node id a Caddy node logged when its cluster
// got ready.
func nodeIDOf(t testing.TB, n *caddyNode) string {
	t.Helper()
	for _, line := range strings.Split(n.p.log.String(), "\n") {
		if !strings.Contains(line, `"msg":"cluster ready"`) {
			continue
		}
		var entry struct {
			Node string `json:"node"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && entry.Node != "" {
			return entry.Node
		}
	}
	t.Fatalf("%s logged no node id", n.name)
	return ""
}

func (n *caddyNode) metric(name string) float64 {
	c := &caddyServer{Admin: fmt.Sprintf("http://127.0.0.1:%d", n.admin)}
	v, err := c.metrics(name)
	if err != nil {
		return -1
	}
	return v[name]
}

// streams returns the node's streams from its admin API.
func (n *caddyNode) streams(t testing.TB) []streamView {
	c := &caddyServer{Admin: fmt.Sprintf("http://127.0.0.1:%d", n.admin)}
	return c.streams(t)
}

// clusterReady reports whether the node's cluster is set up and
// connected, by its admin view.
func (n *caddyNode) clusterReady() bool {
	var hubs []struct {
		Cluster *struct {
			Connected bool `json:"connected"`
			Ready     bool `json:"ready"`
		} `json:"cluster"`
	}
	if !getJSON(fmt.Sprintf("http://127.0.0.1:%d/sse_fanout/streams", n.admin), &hubs) || len(hubs) == 0 {
		return false
	}
	for _, h := range hubs {
		if h.Cluster == nil || !h.Cluster.Connected || !h.Cluster.Ready {
			return false
		}
	}
	return true
}
