package ssefanout

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// streamStats counts what one stream does, for the status page and the
// admin view, and feeds the process-wide metrics with the same numbers, so
// that every call site counts once. Deliveries are counted per write (a
// batch of events to one client) or per pass of the fast path's writer
// (a batch to all of its clients): a few atomic adds, never one per event
// per client.
type streamStats struct {
	events     atomic.Uint64 // events published into the history
	deliveries atomic.Uint64 // events written to clients
	bytes      atomic.Uint64 // bytes written to clients
	dropped    [2]atomic.Uint64
	resumes    [3]atomic.Uint64
	catchUps   atomic.Uint64 // catch-ups started
	liveSince  atomic.Int64  // when the upstream (or the log) went live, Unix ns; 0 while not

	// Delivery lag, sampled: one delivery in lagEvery.
	lagTick atomic.Uint64
	lagMu   sync.Mutex
	lags    *[lagSamples]float64 // the latest samples, seconds; allocated at the first, so idle streams stay small
	lagN    int
}

// lagSamples is how many recent lag samples a stream keeps for its p50 and
// p99 on the status page.
const lagSamples = 256

// The kinds the per-stream counters split by.
const (
	dropLagging = iota
	dropWriteTimeout
)

const (
	resumeHistory = iota
	resumeCatchUp
	resumeLive
)

var (
	dropNames   = [...]string{dropLagging: "lagging", dropWriteTimeout: "write_timeout"}
	resumeNames = [...]string{resumeHistory: "history", resumeCatchUp: "catch_up", resumeLive: "live"}
)

// delivered counts a write to one client.
func (st *streamStats) delivered(t tally) { st.count(t.events, t.bytes, t.at) }

// sent counts a batch that carries t written to n clients at once, which
// took bytes in all (fewer than n×t.bytes when some clients' handlers
// strip retry lines).
func (st *streamStats) sent(n, bytes int, t tally) { st.count(n*t.events, bytes, t.at) }

// count counts deliveries written to clients in n bytes, the oldest of
// the events published at at (monoNow; 0 for events not published live,
// such as a catch-up's). One delivery in lagSampleEvery is sampled for
// the lag histogram, from the event's publication to the end of its
// write.
func (st *streamStats) count(deliveries, n int, at int64) {
	st.wrote(n)
	if deliveries <= 0 {
		return
	}
	st.deliveries.Add(uint64(deliveries))
	metrics.deliveries.Add(float64(deliveries))
	if at == 0 {
		return
	}
	tick := st.lagTick.Add(uint64(deliveries))
	samples := tick/lagSampleEvery - (tick-uint64(deliveries))/lagSampleEvery
	if samples == 0 {
		return
	}
	lag := time.Duration(monoNow() - at).Seconds()
	st.lagMu.Lock()
	if st.lags == nil {
		st.lags = new([lagSamples]float64)
	}
	for range samples {
		metrics.deliveryLag.Observe(lag)
		st.lags[st.lagN%lagSamples] = lag
		st.lagN++
	}
	st.lagMu.Unlock()
}

// lagQuantiles returns the p50 and p99 of the recent lag samples, in
// seconds, and how many there are.
func (st *streamStats) lagQuantiles() (p50, p99 float64, n int) {
	st.lagMu.Lock()
	n = min(st.lagN, lagSamples)
	var l []float64
	if st.lags != nil {
		l = slices.Clone(st.lags[:n])
	}
	st.lagMu.Unlock()
	if n == 0 {
		return 0, 0, 0
	}
	slices.Sort(l)
	return l[(n-1)/2], l[(n-1)*99/100], n
}

// lagSampleEvery is the share of deliveries whose lag is sampled: one in
// 64, deterministically (every 64th), so that sampling costs one atomic
// add per write and a lock only when a sample falls due.
const lagSampleEvery = 64

// wrote counts event-stream bytes written to clients (keepalives alone).
func (st *streamStats) wrote(n int) {
	st.bytes.Add(uint64(n))
	metrics.bytesSent.Add(float64(n))
}

func (st *streamStats) drop(kind int) {
	st.dropped[kind].Add(1)
	metrics.clientsDropped.WithLabelValues(dropNames[kind]).Inc()
}

func (st *streamStats) resume(kind int) {
	st.resumes[kind].Add(1)
	metrics.resumes.WithLabelValues(resumeNames[kind]).Inc()
}

// live records that the stream's source went live or stopped being so;
// the end of a live stretch is observed as an upstream connection's
// duration, unless it was replayed from a cluster log's past, which tells
// nothing of a connection of this moment.
func (st *streamStats) live(on, past bool) {
	now := time.Now().UnixNano()
	if on {
		st.liveSince.CompareAndSwap(0, now)
		return
	}
	if since := st.liveSince.Swap(0); since != 0 && !past {
		metrics.upstreamUptime.Observe(time.Duration(now - since).Seconds())
	}
}

// upstreamOpenHere says whether the stream's upstream connection is open
// in this process: its source is live and, in a cluster, this node holds
// the stream (a follower reads another node's upstream from the log).
func (s *stream) upstreamOpenHere() bool {
	if s.stats.liveSince.Load() == 0 {
		return false
	}
	if cs, ok := s.src.(*clusterSource); ok {
		return cs.role.Load() != roleFollower
	}
	return true
}

// clockStart anchors monoNow.
var clockStart = time.Now()

// monoNow is the time entries are published at, in nanoseconds on the
// monotonic clock (never 0): a step of the wall clock neither makes a
// delivery lag negative nor moves what replay_since replays.
func monoNow() int64 { return int64(time.Since(clockStart)) + 1 }
