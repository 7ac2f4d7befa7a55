package main

import (
	"fmt"
	"time"
)

// Peers: the servers measured.
const (
	peerFanout       = "sse_fanout"    // Caddy with this module
	peerReverseProxy = "reverse_proxy" // the same Caddy, stock reverse_proxy
	peerNchan        = "nchan"         // nginx with the nchan module
	peerNginx        = "nginx_proxy"   // nginx proxy_pass, proxy_buffering off
	peerFloor        = "floor"         // one write(2) per client per event
	// sse_fanout with sse_fanout_status mounted at /status in the same
	// site and one viewer on the page's event stream during the run (Caddy
	// from -caddy-status): the status page's overhead, against sse_fanout.
	// Only when named in -peers.
	peerFanoutStatus = "sse_fanout_status"
)

var allPeers = []string{peerFanout, peerReverseProxy, peerNchan, peerNginx, peerFloor}

// knownPeers are the peers -peers accepts: the default ones and the
// status-page variant.
var knownPeers = append(append([]string(nil), allPeers...), peerFanoutStatus)

// caddyPeer says whether the peer is a Caddy.
func caddyPeer(p string) bool {
	return p == peerFanout || p == peerReverseProxy || p == peerFanoutStatus
}

// Workloads.
const (
	workSteady = "steady" // fan-out at a steady rate, several client counts
	workBig    = "big"    // steady with the most clients one process holds
	workBurst  = "burst"  // bursts at rising rates
	workTLS    = "tls"    // steady over TLS, HTTP/1.1 and HTTP/2
)

var allWorkloads = []string{workSteady, workBig, workBurst, workTLS}

// Client protocols.
const (
	protoH1    = "h1"
	protoH1TLS = "h1-tls"
	protoH2TLS = "h2-tls"
)

// Cell is one measured configuration; its runs are its repetitions.
type Cell struct {
	Workload string  `json:"workload"`
	Peer     string  `json:"peer"`
	Clients  int     `json:"clients"`
	Rate     float64 `json:"rate"`            // events per second
	Proto    string  `json:"proto"`           // protoH1, protoH1TLS or protoH2TLS
	Burst    int     `json:"burst,omitempty"` // events in the burst; 0: a steady stream
}

func (c Cell) String() string {
	s := fmt.Sprintf("%s %s %d clients %g/s %s", c.Workload, c.Peer, c.Clients, c.Rate, c.Proto)
	if c.Burst > 0 {
		s += fmt.Sprintf(" burst of %d", c.Burst)
	}
	return s
}

// fdsPerClient is how many descriptors the peer's process holds per client:
// a proxy with a connection to the origin per client holds two.
func fdsPerClient(peer string) int {
	if peer == peerReverseProxy || peer == peerNginx {
		return 2
	}
	return 1
}

// fdSlack is the descriptors a peer needs besides its clients'.
const fdSlack = 64

// cannot says why a cell cannot run on this machine, or "".
func cannot(c Cell, maxFiles int) string {
	if k := fdsPerClient(c.Peer); k*c.Clients+fdSlack > maxFiles {
		return fmt.Sprintf("cannot (%d fds per client, %d open files per process)", k, maxFiles)
	}
	return ""
}

// plannedRun is one run to make.
type plannedRun struct {
	Cell
	Rep int
}

// block is a set of cells measured together: reps rounds, each running
// every cell once (interleaved repetitions).
type block struct {
	cells []Cell
	reps  int
}

// interleave orders the runs of a block: round 1 of every cell, then round
// 2, and so on, so that a slow drift of the machine spreads over the peers.
func (b block) interleave() []plannedRun {
	var out []plannedRun
	for rep := 1; rep <= b.reps; rep++ {
		for _, c := range b.cells {
			out = append(out, plannedRun{Cell: c, Rep: rep})
		}
	}
	return out
}

// plan makes the runs of the configured workloads, in order.
func (cfg *config) plan() []plannedRun {
	var blocks []block
	steady := func(work string, clients []int, rates []float64, reps int) {
		for _, n := range clients {
			var cells []Cell
			for _, rate := range rates {
				for _, p := range cfg.peers {
					cells = append(cells, Cell{Workload: work, Peer: p, Clients: n, Rate: rate, Proto: protoH1})
				}
			}
			blocks = append(blocks, block{cells: cells, reps: reps})
		}
	}
	for _, w := range cfg.workloads {
		switch w {
		case workSteady:
			// one block for all client counts: the repetitions of each
			// count are interleaved with the others' too
			var b block
			for _, n := range cfg.clients {
				for _, p := range cfg.peers {
					b.cells = append(b.cells, Cell{Workload: w, Peer: p, Clients: n, Rate: cfg.rate, Proto: protoH1})
				}
			}
			b.reps = cfg.reps
			blocks = append(blocks, b)
		case workBig:
			steady(w, cfg.bigClients, cfg.bigRates, cfg.bigReps)
		case workBurst:
			var b block
			for _, rate := range cfg.burstRates {
				for _, p := range cfg.peers {
					b.cells = append(b.cells, Cell{Workload: w, Peer: p, Clients: cfg.burstClients, Rate: rate, Proto: protoH1, Burst: cfg.burstEvents})
				}
			}
			b.reps = cfg.burstReps
			blocks = append(blocks, b)
		case workTLS:
			var b block
			for _, proto := range []string{protoH1TLS, protoH2TLS} {
				for _, p := range cfg.peers {
					if p == peerFanout || p == peerReverseProxy {
						b.cells = append(b.cells, Cell{Workload: w, Peer: p, Clients: cfg.tlsClients, Rate: cfg.rate, Proto: proto})
					}
				}
			}
			b.reps = cfg.tlsReps
			blocks = append(blocks, b)
		}
	}
	var runs []plannedRun
	for _, b := range blocks {
		runs = append(runs, b.interleave()...)
	}
	return runs
}

// Fixed costs of a run besides its window, for the time estimate (as
// measured on a 2-core machine).
const (
	runSetup      = 2 * time.Second // start the origin and the peer, idle sample, stop
	connectPer1k  = 500 * time.Millisecond
	burstDrainEst = time.Second
)

// estimate is about how long the runs take.
func (cfg *config) estimate(runs []plannedRun) time.Duration {
	var d time.Duration
	for _, r := range runs {
		if cannot(r.Cell, cfg.maxFiles) != "" {
			continue
		}
		d += runSetup + time.Duration(r.Clients/1000)*connectPer1k
		if r.Burst > 0 {
			d += time.Duration(float64(r.Burst)/r.Rate*float64(time.Second)) + burstDrainEst
		} else {
			d += cfg.window
		}
	}
	return d
}
