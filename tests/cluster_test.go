package tests

import (
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Many nodes, one upstream: three Caddy processes (built with -race) on a
// three-server NATS JetStream cluster (replicas 3, file storage), and an
// origin that counts its connections and honours Last-Event-ID.

const clusterLease = 3 * time.Second

// clusterBody is a node's site: sse_fanout in front of the origin, on the
// NATS cluster, under a deployment name of the test's own.
func clusterBody(origin, urls, name, extra string) string {
	return fmt.Sprintf(`sse_fanout %s {
		linger 5s
		keepalive 1s
		%s
		cluster nats %s {
			name %s
			replicas 3
			lease %s
		}
	}`, origin, extra, urls, name, clusterLease)
}

// threeNodes starts three Caddy nodes on the NATS cluster.
func threeNodes(t *testing.T, nc *natsCluster, origin, name, extra string) []*caddyNode {
	var nodes []*caddyNode
	for i := range 3 {
		nodes = append(nodes, startCaddyNode(t, fmt.Sprintf("node%d", i+1), clusterBody(origin, nc.urls(), name, extra)))
	}
	for _, n := range nodes {
		eventually(t, 30*time.Second, n.clusterReady, func() string { return n.name + "'s cluster did not get ready" })
	}
	return nodes
}

// heldStream starts three nodes under name with n clients of path spread
// over them, waits until one node holds the stream, then has the origin
// send an event every 100 ms until the first client got 10. The ticker
// stops at the end of the test if the test did not stop it.
func heldStream(t *testing.T, nc *natsCluster, o *eventOrigin, name, path string, n int) (nodes []*caddyNode, clients []*esClient, holder int, tk *ticker) {
	t.Helper()
	nodes = threeNodes(t, nc, o.URL, name, "")
	for i := range n {
		c := &esClient{}
		c.follow(t, nodes[i%3].Base+path)
		t.Cleanup(c.close)
		clients = append(clients, c)
	}
	eventually(t, 15*time.Second, func() bool { holder = holderOf(t, nodes); return holder >= 0 && o.open() == 1 }, func() string { return "no holder" })
	time.Sleep(500 * time.Millisecond)
	tk = o.tick(100 * time.Millisecond)
	t.Cleanup(func() { tk.halt() })
	clients[0].waitEvent(t, 10, 10*time.Second)
	return nodes, clients, holder, tk
}

// holderOf returns the index of the node that holds the stream, by the
// nodes' admin views, or -1.
func holderOf(t testing.TB, nodes []*caddyNode) int {
	for i, n := range nodes {
		if n.p.exited() {
			continue
		}
		for _, s := range n.streams(t) {
			if s.ClusterRole == "holder" {
				return i
			}
		}
	}
	return -1
}

func TestClusterOneUpstreamAndResumeAnywhere(t *testing.T) {
	nc := startNATSCluster(t)
	o := newEventOrigin(t)
	nodes := threeNodes(t, nc, o.URL, "one", "")

	// clients of one stream on all three nodes
	var clients []*esClient
	for i := range 9 {
		c := &esClient{}
		c.follow(t, nodes[i%3].Base+"/s")
		t.Cleanup(c.close)
		clients = append(clients, c)
	}
	eventually(t, 15*time.Second, func() bool { return o.open() == 1 && holderOf(t, nodes) >= 0 }, func() string {
		return fmt.Sprintf("origin holds %d connections, holder %d", o.open(), holderOf(t, nodes))
	})
	time.Sleep(500 * time.Millisecond) // the followers are on the log
	for range 50 {
		o.publish()
	}
	for i, c := range clients {
		c.waitEvent(t, 50, 10*time.Second)
		c.checkExact(t, fmt.Sprintf("client %d on node %d", i, i%3+1), 1, 50)
	}
	if n := o.total.Load(); n != 1 {
		t.Fatalf("the origin saw %d connections for one stream on three nodes, want 1", n)
	}

	// a client moves from node to node with its Last-Event-ID
	mover := clients[0]
	mover.close()
	for range 10 {
		o.publish()
	}
	mover.follow(t, nodes[1].Base+"/s")
	mover.waitEvent(t, 60, 10*time.Second)
	mover.close()
	for range 10 {
		o.publish()
	}
	mover.follow(t, nodes[2].Base+"/s")
	mover.waitEvent(t, 70, 10*time.Second)
	mover.checkExact(t, "the client that moved between nodes", 1, 70)
	if n := o.total.Load(); n != 1 {
		t.Fatalf("moving between nodes made %d origin connections, want 1", n)
	}
}

// A 404 and a 204 from the origin reach a client of a node that does not
// hold the stream, as the origin sent them.
func TestClusterFinalAnswersReachEveryNode(t *testing.T) {
	nc := startNATSCluster(t)
	o := newEventOrigin(t)
	nodes := threeNodes(t, nc, o.URL, "final", "status_wait 10s")
	for _, status := range []int{http.StatusNotFound, http.StatusNoContent} {
		o.status.Store(int32(status))
		path := fmt.Sprintf("/final%d", status)
		var clients []*esClient
		for i := range 3 {
			c := &esClient{}
			go func() { _ = c.connect(nodes[i].Base + path) }()
			clients = append(clients, c)
		}
		for i, c := range clients {
			eventually(t, 15*time.Second, func() bool {
				c.mu.Lock()
				defer c.mu.Unlock()
				return c.status != 0
			}, func() string { return "no answer" })
			c.mu.Lock()
			st, body := c.status, c.body
			c.mu.Unlock()
			if st != status {
				t.Fatalf("node %d answered %d, want the origin's %d", i+1, st, status)
			}
			if status == http.StatusNotFound && !strings.Contains(body, "answered 404") {
				t.Fatalf("node %d passed on %q, want the origin's body", i+1, body)
			}
		}
	}

	// a node restarted with another history gives the shared log its
	// limits instead of silently keeping those of the config that made it
	if got := nc.logMaxPerSubject("SSEFANOUT_final"); got != 1000 {
		t.Fatalf("the log keeps %d events per stream, want the default history 1000", got)
	}
	n := nodes[0]
	n.p.stop()
	n.rewrite(t, "status_wait 10s", "status_wait 10s\n\t\thistory 20")
	n.start(t)
	eventually(t, 30*time.Second, func() bool { return nc.logMaxPerSubject("SSEFANOUT_final") == 20 }, func() string {
		return fmt.Sprintf("the log keeps %d events per stream after a node restarted with history 20", nc.logMaxPerSubject("SSEFANOUT_final"))
	})
}

// kill -9 of the holding node: another node takes over within lease + 2 s,
// asks the origin from the last committed id, and no client that stays or
// moves sees a gap or a duplicate.
func TestClusterTakeOverAfterKill(t *testing.T) {
	nc := startNATSCluster(t)
	o := newEventOrigin(t)
	nodes, clients, holder, tk := heldStream(t, nc, o, "kill", "/k", 6)

	killed := time.Now()
	nodes[holder].p.signal(syscall.SIGKILL)
	<-nodes[holder].p.done
	var next int
	eventually(t, clusterLease+10*time.Second, func() bool {
		next = holderOf(t, nodes)
		return next >= 0 && next != holder
	}, func() string { return "no node took the stream over" })
	t.Logf("node %d took over %v after node %d was killed", next+1, time.Since(killed).Round(time.Millisecond), holder+1)
	if d := time.Since(killed); d > clusterLease+2*time.Second+time.Second {
		t.Errorf("take-over after %v, want within lease + 2 s", d)
	}
	// the clients of the killed node move to the others
	for i, c := range clients {
		if i%3 == holder {
			c.close()
			c.follow(t, nodes[(holder+1)%3].Base+"/k")
		}
	}
	time.Sleep(time.Second)
	last := tk.halt()
	for i, c := range clients {
		c.waitEvent(t, last, 15*time.Second)
		c.checkExact(t, fmt.Sprintf("client %d", i), 1, last)
	}
	eventually(t, 5*time.Second, func() bool { return o.open() == 1 }, func() string { return fmt.Sprintf("origin holds %d connections", o.open()) })
}

// The same with an origin that ignores Last-Event-ID: the events it sent
// while no node held the stream are lost, and the new holder counts them.
func TestClusterTakeOverGapCounted(t *testing.T) {
	nc := startNATSCluster(t)
	o := newEventOrigin(t)
	o.ignoreID.Store(true)
	nodes, clients, holder, tk := heldStream(t, nc, o, "gap", "/g", 3)
	nodes[holder].p.signal(syscall.SIGKILL)
	<-nodes[holder].p.done
	var next int
	eventually(t, clusterLease+10*time.Second, func() bool {
		next = holderOf(t, nodes)
		return next >= 0 && next != holder && o.open() == 1
	}, func() string { return "no node took the stream over" })
	time.Sleep(time.Second)
	last := tk.halt()
	survivor := clients[next]
	survivor.waitEvent(t, last, 15*time.Second)
	got := survivor.snapshot()
	lost := last - len(got)
	if lost <= 0 {
		t.Fatalf("no event was lost (%d of %d): the origin did not ignore Last-Event-ID, the test did not test", len(got), last)
	}
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] && len(got[i]) <= len(got[i-1]) {
			t.Fatalf("a duplicate or disorder: %v", got)
		}
	}
	if counted := nodes[next].metric("caddy_sse_fanout_cluster_takeover_gap_events_total"); int(counted) != lost {
		t.Fatalf("the new holder counted %v events in the take-over gap, the clients lost %d", counted, lost)
	}
}

// A holder paused (SIGSTOP) for three leases loses the stream to another
// node; when it resumes, its writes are refused, it closes its upstream
// within 2 s, and no client sees a duplicate.
func TestClusterPausedHolderIsFenced(t *testing.T) {
	nc := startNATSCluster(t)
	o := newEventOrigin(t)
	nodes, clients, holder, tk := heldStream(t, nc, o, "pause", "/p", 3)

	nodes[holder].p.signal(syscall.SIGSTOP)
	time.Sleep(3 * clusterLease)
	if o.open() != 2 {
		t.Fatalf("while the holder was paused, the origin held %d connections, want its stale one and the new holder's", o.open())
	}
	resumed := time.Now()
	nodes[holder].p.signal(syscall.SIGCONT)
	eventually(t, 2*time.Second+time.Second, func() bool { return o.open() == 1 }, func() string {
		return fmt.Sprintf("2 s after the paused holder resumed the origin held %d connections, want 1", o.open())
	})
	t.Logf("the stale holder closed its upstream %v after it resumed", time.Since(resumed).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond)
	last := tk.halt()
	for i, c := range clients {
		if i == holder {
			continue // its node was paused: it may have dropped the stream
		}
		c.waitEvent(t, last, 15*time.Second)
		c.checkExact(t, fmt.Sprintf("client %d", i), 1, last)
	}
	if f := nodes[holder].metric("caddy_sse_fanout_cluster_fenced_total"); f < 1 {
		t.Errorf("the stale holder counted %v refused writes, want at least 1", f)
	}
}

// checkOutage checks that every client (client i on node i%3+1) got events
// 1..last exactly once, and never paused longer than lease + 2 s; a pause
// is reported from the outage's start, what.
func checkOutage(t *testing.T, clients []*esClient, last int, start time.Time, what string) {
	t.Helper()
	for i, c := range clients {
		c.waitEvent(t, last, 15*time.Second)
		c.checkExact(t, fmt.Sprintf("client %d", i), 1, last)
		if p, from := c.maxPause(); p > clusterLease+2*time.Second {
			t.Errorf("client %d (node%d) paused %v from %v after %s, want at most lease + 2 s",
				i, i%3+1, p.Round(time.Millisecond), from.Sub(start).Round(time.Millisecond), what)
		}
	}
}

// A follower's own NATS server crashes while it leads the log: the node
// loses its connection, and its log consumer with the election that
// follows. The connection moves to another server, and the node makes its
// consumer again at once rather than waiting for the client library's
// background retries (up to 10 s each, telling no one), so its clients
// pause no longer than lease + 2 s, and every client gets every event
// exactly once.
func TestClusterFollowerLosesItsNATSServer(t *testing.T) {
	nc := startNATSCluster(t)
	o := newEventOrigin(t)
	nodes, clients, holder, tk := heldStream(t, nc, o, "moved", "/m", 3)
	follower := (holder + 1) % 3
	server := nc.serverOf(t, nodeIDOf(t, nodes[follower]))
	nc.moveLeader(t, "SSEFANOUT_moved", server)
	time.Sleep(time.Second)
	crashed := time.Now()
	nc.nodes[server].p.kill()
	t.Logf("killed %s, the log's leader and node%d's NATS server (the holder is node%d)", nc.nodes[server].name, follower+1, holder+1)
	time.Sleep(2*clusterLease + time.Second)
	checkOutage(t, clients, tk.halt(), crashed, "the NATS server crashed")
}

// The NATS server that leads the log stops, then all three: clients never
// pause longer than lease + 2 s (the log's fail-over, then each node's
// fall-back to its own upstream), and when NATS is back the nodes rejoin
// it with no duplicate.
func TestClusterSurvivesNATS(t *testing.T) {
	nc := startNATSCluster(t)
	o := newEventOrigin(t)
	nodes := threeNodes(t, nc, o.URL, "outage", "")
	var clients []*esClient
	for i := range 3 {
		c := &esClient{}
		c.follow(t, nodes[i].Base+"/o")
		t.Cleanup(c.close)
		clients = append(clients, c)
	}
	eventually(t, 15*time.Second, func() bool { return holderOf(t, nodes) >= 0 && o.open() == 1 }, func() string { return "no holder" })
	time.Sleep(500 * time.Millisecond)
	tk := o.tick(100 * time.Millisecond)
	defer tk.halt()
	clients[0].waitEvent(t, 10, 10*time.Second)

	leader := nc.streamLeader("SSEFANOUT_outage")
	if leader < 0 {
		t.Fatal("no leader for the log stream")
	}
	leaderStopped := time.Now()
	nc.nodes[leader].p.stop()
	time.Sleep(3 * time.Second)
	for _, n := range nc.nodes {
		if !n.p.exited() {
			n.p.stop()
		}
	}
	allStopped := time.Now()
	t.Log("all NATS servers stopped")
	time.Sleep(2 * clusterLease)
	if o.open() != 3 {
		t.Errorf("with NATS down, the origin held %d connections, want one per node (their fall-backs)", o.open())
	}
	for i := range nc.nodes {
		nc.start(i)
	}
	nc.waitReady(30 * time.Second)
	back := time.Now()
	t.Log("NATS back")
	eventually(t, 30*time.Second, func() bool { return o.open() == 1 }, func() string {
		return fmt.Sprintf("after NATS came back the origin held %d connections, want 1", o.open())
	})
	time.Sleep(time.Second)
	checkOutage(t, clients, tk.halt(), leaderStopped, fmt.Sprintf("the log's leader stopped (all NATS stopped at %v, back at %v)",
		allStopped.Sub(leaderStopped).Round(time.Millisecond), back.Sub(leaderStopped).Round(time.Millisecond)))
}

// Tiers, without any engine: edge nodes point at a shield node that points
// at the origin. The origin sees one connection, and a client moving
// between edges resumes with no gap.
func TestTiers(t *testing.T) {
	o := newEventOrigin(t)
	shield := startCaddyNode(t, "shield", "sse_fanout "+o.URL+" {\n linger 5s\n}")
	edge1 := startCaddyNode(t, "edge1", "sse_fanout "+shield.Base+" {\n linger 5s\n}")
	edge2 := startCaddyNode(t, "edge2", "sse_fanout "+shield.Base+" {\n linger 5s\n}")
	a, b := &esClient{}, &esClient{}
	a.follow(t, edge1.Base+"/t")
	b.follow(t, edge2.Base+"/t")
	t.Cleanup(a.close)
	t.Cleanup(b.close)
	eventually(t, 10*time.Second, func() bool { return o.open() == 1 }, func() string { return "the shield did not connect" })
	time.Sleep(500 * time.Millisecond)
	for range 10 {
		o.publish()
	}
	a.waitEvent(t, 10, 5*time.Second)
	b.waitEvent(t, 10, 5*time.Second)
	a.close()
	for range 10 {
		o.publish()
	}
	a.follow(t, edge2.Base+"/t") // moves to the other edge with its Last-Event-ID
	a.waitEvent(t, 20, 5*time.Second)
	a.checkExact(t, "the client that moved between edges", 1, 20)
	b.waitEvent(t, 20, 5*time.Second)
	b.checkExact(t, "the client that stayed", 1, 20)
	if n := o.total.Load(); n != 1 {
		t.Fatalf("the origin saw %d connections behind two edges and a shield, want 1", n)
	}
}
