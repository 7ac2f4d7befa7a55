package ssefanout

import (
	"context"
	"errors"

	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// clusterSource is the source of a stream on a node of a cluster: the log,
// which the holder of the stream's lease writes from its upstream, and
// which every node follows into its history; or, while NATS is out of
// reach, the node's own upstream (the fall-back).
type clusterSource struct {
	s       *stream
	cl      *clusterHub
	digest  string
	subject string

	role     atomic.Int32 // roleFollower, roleHolder or roleFallback
	holder   atomic.Pointer[string]
	progress chan struct{} // signalled whenever a log message is applied
	// followErrSince and commitErrSince are when the log started failing
	// the follower and the holder (Unix ns; zero while it does not)
	followErrSince, commitErrSince atomic.Int64

	// applyMu makes one log message's apply whole: a consumer that is
	// being stopped may still deliver while the next one starts
	applyMu sync.Mutex

	mu sync.Mutex
	// applied is the log sequence of the last message applied to the
	// history; zero before the first.
	applied uint64
	// originID is the origin's last committed id as applied (from the log,
	// or from the node's own upstream in fall-back).
	originID    string
	hasOriginID bool
	proxySeq    uint64 // assign_ids: the last proxy sequence applied
	// splice is the id of the history's newest entry after a fall-back:
	// the log is applied from right after it
	splice    string
	hasSplice bool
	// spliceUntil bounds the wait for the log to reach splice
	spliceUntil time.Time
}

// Roles of a node for a stream, for the metrics and the admin view.
const (
	roleFollower int32 = iota
	roleHolder
	roleFallback
)

var roleNames = [...]string{roleFollower: "follower", roleHolder: "holder", roleFallback: "fallback"}

func newClusterSource(s *stream, cl *clusterHub) *clusterSource {
	d := digest(s.key)
	c := &clusterSource{s: s, cl: cl, digest: d, subject: cl.subjectPrefix + d, progress: make(chan struct{}, 1)}
	c.setOrigin(s.initialID, s.initialID != "")
	return c
}

func (c *clusterSource) setOrigin(id string, ok bool) {
	c.mu.Lock()
	c.originID, c.hasOriginID = id, ok
	c.mu.Unlock()
}

func (c *clusterSource) origin() (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.originID, c.hasOriginID
}

func (c *clusterSource) setRole(r int32) {
	if old := c.role.Swap(r); old != r {
		metrics.clusterStreams.WithLabelValues(roleNames[old]).Dec()
		metrics.clusterStreams.WithLabelValues(roleNames[r]).Inc()
		c.debug("cluster: the stream's role on this node changes", zap.String("from", roleNames[old]), zap.String("to", roleNames[r]))
	}
}

func (c *clusterSource) logger() *zap.Logger { return c.s.hub.current().logger }

func (c *clusterSource) debug(msg string, fields ...zap.Field) {
	if ce := c.logger().Check(zapcore.DebugLevel, msg); ce != nil {
		ce.Write(append(fields, zap.String("stream", c.s.name))...)
	}
}

// spliceWait bounds how long a node that rejoins after a fall-back skips
// the log's entries, waiting for the newest id its own upstream gave: a
// new holder may first have to ask the origin for what the node already
// has.
const spliceWait = 10 * time.Second

// errUnhealthy ends a stretch of following the log: NATS went out of reach.
var errUnhealthy = errors.New("NATS out of reach")

// run follows the log while NATS answers, and falls back to the node's own
// upstream while it does not, until the stream ends.
func (c *clusterSource) run(ctx context.Context, sink sink) {
	metrics.clusterStreams.WithLabelValues(roleNames[roleFollower]).Inc()
	defer func() { metrics.clusterStreams.WithLabelValues(roleNames[c.role.Load()]).Dec() }()
	defer c.dropInterest()
	// at first, NATS may still be setting up: the stream waits a lease
	// for it; once it has been followed, an outage falls back at once
	wait := time.Duration(c.cl.cfg.Lease)
	for ctx.Err() == nil {
		if c.waitHealthy(ctx, wait) {
			c.setRole(roleFollower)
			if over := c.clustered(ctx, sink); over {
				return
			}
			wait = 0
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if c.cl.cfg.NoFallback {
			// the node ends its streams; EventSources come back (to
			// another node, as the load balancer sees fit)
			c.logger().Warn("NATS out of reach and fall-back off: ending the stream", zap.String("stream", c.s.name))
			sink.answer(answer{state: stateFinal, final: clusterUnavailable()})
			return
		}
		c.setRole(roleFallback)
		if over := c.fallback(ctx, sink); over {
			return
		}
	}
}

// clusterUnavailable is the answer of a node cut off from NATS with the
// fall-back off: what a refused EventSource gets, so that it comes back.
func clusterUnavailable() *finalAnswer {
	return &finalAnswer{status: 200, header: map[string][]string{"Content-Type": {"text/event-stream"}, "Cache-Control": {"no-cache, no-transform"}},
		body: appendRetry(nil, refusalRetryMinMillis), reason: "NATS out of reach, fall-back off"}
}

// waitHealthy waits up to within for NATS to answer (rejoinAfter in a
// row, when coming back from a fall-back).
func (c *clusterSource) waitHealthy(ctx context.Context, within time.Duration) bool {
	need := time.Duration(0)
	if c.role.Load() == roleFallback {
		need = rejoinAfter
	}
	deadline := time.Now().Add(within)
	var since time.Time
	for {
		if c.cl.healthy() {
			if since.IsZero() {
				since = time.Now()
			}
			if time.Since(since) >= need {
				return true
			}
		} else {
			since = time.Time{}
			if c.role.Load() != roleFallback && time.Now().After(deadline) {
				return false
			}
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
		if c.role.Load() == roleFallback && !c.cl.healthy() && time.Now().After(deadline) {
			return false
		}
	}
}

// clustered follows the log and competes for the lease until NATS has been
// out of reach for a lease's time (false), or the stream is over (true): the
// origin's final answer, once the follower has applied it (the holder's
// own clients get it from the log, like everyone's).
func (c *clusterSource) clustered(ctx context.Context, sink sink) (over bool) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.putInterest(ctx)
	followDone, leadDone := make(chan error, 1), make(chan error, 1)
	go func() { followDone <- c.follow(ctx, sink) }()
	go func() { leadDone <- c.lead(ctx) }()
	followEnded, leadEnded := false, false
	defer func() {
		cancel()
		// the holder's upstream closes before any other starts; the
		// follower may be slow to notice a NATS call's end, but applies
		// nothing once ctx ended
		if !leadEnded {
			<-leadDone
		}
		if !followEnded {
			select {
			case <-followDone:
			case <-time.After(500 * time.Millisecond):
			}
		}
	}()
	leadCh := leadDone
	var finalTimeout <-chan time.Time
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case err := <-followDone:
			followEnded = true
			return errors.Is(err, errStreamOver)
		case err := <-leadCh:
			leadEnded, leadCh = true, nil
			if errors.Is(err, errStreamOver) {
				// the follower applies the final answer from the log
				finalTimeout = time.After(5 * time.Second)
			}
		case <-finalTimeout:
			return true
		case <-ctx.Done():
			return true
		case <-t.C:
		}
		if c.cl.healthy() && !c.stalled() {
			continue
		}
		// out of reach since JetStream last answered, or since the log
		// started failing this node
		since := time.Now()
		if !c.cl.healthy() {
			since = time.Unix(0, c.cl.answered.Load())
		}
		for _, t := range []int64{c.followErrSince.Load(), c.commitErrSince.Load()} {
			if t != 0 && time.Unix(0, t).Before(since) {
				since = time.Unix(0, t)
			}
		}
		if time.Since(since) > time.Duration(c.cl.cfg.Lease) {
			c.logger().Warn("NATS out of reach: the stream falls back to this node's own upstream", zap.String("stream", c.s.name))
			return false
		}
	}
}

// errStreamOver: the origin gave its final answer.
var errStreamOver = errors.New("stream over")

// stalled reports whether the log has stopped taking or giving: set by
// the follower and the holder while their NATS calls fail.
func (c *clusterSource) stalled() bool {
	return c.followErrSince.Load() != 0 && time.Since(time.Unix(0, c.followErrSince.Load())) > time.Second ||
		c.commitErrSince.Load() != 0 && time.Since(time.Unix(0, c.commitErrSince.Load())) > time.Second
}

// fallback serves the stream from the node's own upstream, resumed with
// the last origin id the history has, until NATS answers again.
func (c *clusterSource) fallback(ctx context.Context, sink sink) (over bool) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	id, _ := c.origin() // "" when the history has no origin id
	u := c.s.upstreamFrom(id, sourceStream)
	if c.s.hub.assignIDs {
		_, _, _, epoch := c.cl.objects()
		c.mu.Lock()
		u.ids = &idAssigner{epoch: epoch, seq: c.proxySeq}
		c.mu.Unlock()
		if u.ids.epoch == "" {
			u.ids = newIDAssigner()
		}
	}
	ended := make(chan struct{})
	fs := &fallbackSink{c: c, sink: sink}
	go func() {
		defer close(ended)
		u.run(ctx, fs)
	}()
	defer func() {
		cancel() // the own upstream closes before the log is followed again
		<-ended
	}()
	var since time.Time
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ended:
			return true // a final answer, or the stream's end
		case <-ctx.Done():
			return true
		case <-t.C:
		}
		if !c.cl.healthy() {
			since = time.Time{}
			continue
		}
		if since.IsZero() {
			since = time.Now()
		}
		if time.Since(since) >= rejoinAfter {
			// rejoin: the log is applied from right after the newest
			// entry this node's own upstream gave
			c.s.mu.RLock()
			if h := &c.s.hist; h.count > 0 {
				for seq := h.head; seq > h.oldest(); seq-- {
					if e := h.at(seq - 1); e.setsID {
						c.mu.Lock()
						c.splice, c.hasSplice = e.id, true
						c.spliceUntil = time.Now().Add(spliceWait)
						c.mu.Unlock()
						break
					}
				}
			}
			c.s.mu.RUnlock()
			c.logger().Info("NATS back: the stream rejoins the cluster", zap.String("stream", c.s.name))
			return false
		}
	}
}

// fallbackSink feeds the history from the node's own upstream, noting the
// origin's ids for the rejoin.
type fallbackSink struct {
	c    *clusterSource
	sink sink
}

func (f *fallbackSink) answer(a answer) { f.sink.answer(a) }

func (f *fallbackSink) append(e entry) { f.sink.append(e) }

// originID records the origin's committed id (see upstream.read).
func (f *fallbackSink) originID(id string) { f.c.setOrigin(id, true) }

// follow applies the log's messages of the stream to its history, from
// where it stands, and keeps doing so as they come; a consumer that fails
// is made again from the next sequence.
func (c *clusterSource) follow(ctx context.Context, sink sink) error {
	past := &logPast{since: time.Now()}
	for backoff := 100 * time.Millisecond; ctx.Err() == nil; backoff = min(2*backoff, time.Second) {
		err := c.consume(ctx, sink, past)
		if errors.Is(err, errStreamOver) {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		c.followErrSince.CompareAndSwap(0, time.Now().UnixNano())
		c.debug("cluster: following the log again", zap.Error(err))
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
	}
	return nil
}

// logPast is what the log held when this node began following it: a
// final answer in it is the past of a stream that the holder asks again.
// It is read once, by the first consumer that gets an answer from the log,
// and kept by the consumers made after a failure: what the log took while
// they were being made is new to this follower, and a final answer among
// it ends the stream. When the first read is late (NATS settling, its
// server stalled), what was written after the follower began is new all
// the same, by the log's timestamps.
type logPast struct {
	since time.Time // when the follower began
	end   uint64    // the subject's last sequence at the first read
	read  bool
}

// learn reads where the past ends in the log, unless it was read before.
func (p *logPast) learn(ctx context.Context, log jetstream.Stream, subject string) error {
	if p.read {
		return nil
	}
	m, err := log.GetLastMsgForSubject(ctx, subject)
	switch {
	case err == nil:
		p.end = m.Sequence
	case !errors.Is(err, jetstream.ErrMsgNotFound):
		return err
	}
	p.read = true
	return nil
}

// holds reports whether a log message is of the past.
func (p *logPast) holds(md *jetstream.MsgMetadata) bool {
	return md.Sequence.Stream <= p.end && md.Timestamp.Before(p.since)
}

// consume runs one consumer of the stream's subject until it fails.
func (c *clusterSource) consume(ctx context.Context, sink sink, past *logPast) error {
	log, _, _, epoch := c.cl.objects()
	c.mu.Lock()
	start, splicing := c.applied+1, c.hasSplice
	c.mu.Unlock()
	// an ordered consumer, in one server's memory: made again by follow
	// after any failure (the client library's own reset makes one
	// attempt), and dropped by the server 30 s after this follower is gone
	ocfg := jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{c.subject}, DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: start,
		InactiveThreshold: 30 * time.Second, MaxResetAttempts: 1,
	}
	if start == 1 || splicing {
		// the whole retained log: the history of a stream new on this
		// node, or the ground on which a rejoin splices
		ocfg.DeliverPolicy, ocfg.OptStartSeq = jetstream.DeliverAllPolicy, 0
	}
	// after a reconnect an ordered consumer resets itself in the
	// background, telling no one, for up to 10 s: the follower makes a
	// new one itself, at once, and counts the time as the log failing it
	// until it has one
	reconnected := c.cl.link.reconnects()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	if err := past.learn(cctx, log, c.subject); err != nil {
		cancel()
		return err
	}
	cons, err := log.OrderedConsumer(cctx, ocfg)
	cancel()
	if err != nil {
		return err
	}
	failed := make(chan error, 1)
	over := make(chan struct{})
	var overOnce sync.Once
	var stopped atomic.Bool
	cc, err := cons.Consume(func(m jetstream.Msg) {
		md, err := m.Metadata()
		if err != nil {
			return
		}
		if stopped.Load() || ctx.Err() != nil {
			return // this consumer, or this stretch of following, is over
		}
		c.followErrSince.Store(0)
		if final := c.apply(m, md, sink, epoch, past.holds(md)); final {
			overOnce.Do(func() { close(over) })
		}
	}, jetstream.PullHeartbeat(time.Second), jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		select {
		case failed <- err:
		default:
		}
	}))
	if err != nil {
		return err
	}
	defer func() {
		// Stop waits for a reset the client library may have under way,
		// up to 10 s: the next consumer does not wait for it, and what
		// this one still delivers meanwhile is dropped
		stopped.Store(true)
		go cc.Stop()
	}()
	// JetStream made the consumer: the log answers this node again, even
	// on a stream too quiet to deliver anything soon
	if ctx.Err() == nil {
		c.followErrSince.Store(0)
	}
	select {
	case <-ctx.Done():
		return nil
	case <-over:
		return errStreamOver
	case err := <-failed:
		return err
	case <-reconnected:
		return errReconnected
	}
}

// errReconnected ends a consumer after the NATS connection came back.
var errReconnected = errors.New("NATS connection back: following the log with a new consumer")

// apply feeds one log message to the history. It reports whether the
// message ended the stream (the origin's final answer, outside the
// history being loaded: a final answer in the log is the past of a stream
// that a new holder asks again).
func (c *clusterSource) apply(m jetstream.Msg, md *jetstream.MsgMetadata, sink sink, epoch string, loading bool) (final bool) {
	c.applyMu.Lock()
	defer c.applyMu.Unlock()
	c.mu.Lock()
	// a rejoin replays the retained log on purpose, to find its splice
	seen := md.Sequence.Stream <= c.applied && !c.hasSplice
	c.mu.Unlock()
	if seen {
		return false // delivered again, by the consumer that followed its stopping one
	}
	h := m.Headers()
	if h.Get(hdrDigest) != c.digest {
		c.logger().Warn("cluster: a log message of another stream on this stream's subject was ignored", zap.String("stream", c.s.name))
		return false
	}
	if e := h.Get(hdrEpoch); e != epoch && epoch != "" {
		// the log lost its history (deleted, made again): its entries are
		// not this history's; ids are never matched across epochs
		c.debug("cluster: a log message of another epoch was ignored")
		return false
	}
	records, err := readRecords(m.Data())
	if err != nil {
		c.logger().Warn("cluster: a malformed log message was ignored", zap.String("stream", c.s.name), zap.Error(err))
		return false
	}
	if n := h.Get(hdrNode); n != "" {
		c.holder.Store(&n)
	}
	c.mu.Lock()
	splice, splicing := c.splice, c.hasSplice
	c.mu.Unlock()
	for _, r := range records {
		if r.answer != nil {
			if r.answer.final != nil && loading {
				continue
			}
			a := *r.answer
			a.past = loading
			sink.answer(a)
			final = final || r.answer.final != nil
			continue
		}
		if splicing {
			// a rejoin: what the history has up to its newest id is
			// skipped, and the log applied after it
			if r.entry.setsID && r.entry.id == splice {
				splicing = false
			}
			continue
		}
		sink.append(r.entry)
	}
	c.mu.Lock()
	if splicing && time.Now().After(c.spliceUntil) {
		// the newest id of the fall-back did not come in the log: the log
		// goes on from here, and what lies between is a gap
		splicing = false
		metrics.clusterRejoinGaps.Inc()
	}
	c.hasSplice = splicing
	c.applied = md.Sequence.Stream
	if v, ok := h[hdrOriginID]; ok && len(v) > 0 {
		c.originID, c.hasOriginID = v[0], true
	}
	if v := h.Get(hdrProxySeq); v != "" {
		c.proxySeq, _ = strconv.ParseUint(v, 10, 64)
	}
	c.mu.Unlock()
	select {
	case c.progress <- struct{}{}:
	default:
	}
	return final
}

// awaitApplied waits, at most within, until the history has applied the
// subject's last message as of now: a Last-Event-ID is then called unknown
// only when no node's holder has published it.
func (c *clusterSource) awaitApplied(within time.Duration) {
	if c.role.Load() == roleFallback || !c.cl.healthy() {
		return
	}
	log, _, _, _ := c.cl.objects()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	m, err := log.GetLastMsgForSubject(ctx, c.subject)
	if err != nil {
		return
	}
	for {
		c.mu.Lock()
		done := c.applied >= m.Sequence
		c.mu.Unlock()
		if done {
			return
		}
		select {
		case <-c.progress:
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// putInterest records that this node has the stream open, so that its
// holder, wherever it is, keeps the upstream while any node does.
func (c *clusterSource) putInterest(ctx context.Context) {
	_, _, kv, _ := c.cl.objects()
	if kv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, _ = kv.Put(ctx, "i."+c.digest+"."+nodeID, []byte(nodeID))
}

// dropInterest removes this node's interest once the stream is closed.
func (c *clusterSource) dropInterest() {
	_, _, kv, _ := c.cl.objects()
	if kv == nil || !c.cl.link.connected() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = kv.Delete(ctx, "i."+c.digest+"."+nodeID)
}

// othersInterested reports whether a live node other than this one has
// the stream open: its holder then keeps the upstream after its own last
// client left. When NATS does not answer it says no: the other nodes then
// fall back to their own upstreams.
func (c *clusterSource) othersInterested() bool {
	_, _, kv, _ := c.cl.objects()
	if kv == nil || !c.cl.healthy() {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	keys, err := kv.ListKeysFiltered(ctx, "i."+c.digest+".*")
	if err != nil {
		return false
	}
	for key := range keys.Keys() {
		node := key[len("i."+c.digest+"."):]
		if node == nodeID {
			continue
		}
		if _, err := kv.Get(ctx, "node."+node); err == nil {
			_ = keys.Stop()
			return true
		}
	}
	return false
}

// lead competes for the stream's lease, and holds the stream while it has
// it, until ctx ends or the stream is over.
func (c *clusterSource) lead(ctx context.Context) error {
	lease := time.Duration(c.cl.cfg.Lease)
	for ctx.Err() == nil {
		rev, err := c.acquire(ctx)
		if err == nil {
			if over := c.hold(ctx, rev); over {
				return errStreamOver
			}
			continue
		}
		select {
		case <-ctx.Done():
		case <-time.After(min(lease/3, 500*time.Millisecond)):
		}
	}
	return nil
}

// acquire takes the lease if nobody holds it: a create-if-absent (a
// publish expecting the key's subject to be empty, or to end in the
// marker its expiry or release left), with the lease as the key's own
// time to live. A read from any replica only says whom to wait for; the
// compare-and-set decides.
func (c *clusterSource) acquire(ctx context.Context) (uint64, error) {
	leaseLog := c.cl.leaseLog()
	if leaseLog == nil {
		return 0, errUnhealthy
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	subject := "$KV." + c.cl.leaseBucket + "." + c.digest
	expect := uint64(0)
	m, err := leaseLog.GetLastMsgForSubject(ctx, subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return 0, err
	case isKVMarker(m.Header):
		expect = m.Sequence
	default:
		n := string(m.Data)
		c.holder.Store(&n)
		return 0, errHeld
	}
	pa, err := c.cl.link.js.PublishMsg(ctx, &nats.Msg{Subject: subject, Data: []byte(nodeID)},
		jetstream.WithExpectLastSequencePerSubject(expect), jetstream.WithMsgTTL(time.Duration(c.cl.cfg.Lease)))
	if err != nil {
		return 0, err
	}
	return pa.Sequence, nil
}

// isKVMarker reports whether a KV subject's message is a delete or purge
// marker (a release, or an expiry's limit marker) rather than a value.
func isKVMarker(h nats.Header) bool {
	return h.Get("KV-Operation") != "" || h.Get("Nats-Marker-Reason") != ""
}

var errHeld = errors.New("lease held by another node")

// errFenced: another holder wrote the subject since this one last did.
var errFenced = errors.New("fenced: another node holds the stream")

// errLeaseLost: the lease could not be refreshed in time.
var errLeaseLost = errors.New("lease lost")

// hold is this node's time as the stream's holder: a take-over marker
// first (so that a stale holder's next write is refused), then the
// upstream, resumed from the last origin id the log committed, written to
// the log in batches. It ends when the lease is lost, the log refuses a
// write, or ctx ends (the lease is then released); over reports the
// origin's final answer.
func (c *clusterSource) hold(ctx context.Context, rev uint64) (over bool) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.setRole(roleHolder)
	defer c.setRole(roleFollower)
	me := nodeID
	c.holder.Store(&me)
	w := &logWriter{c: c, leaseRev: rev, kvRev: rev}
	prev, err := w.takeOver(ctx)
	if err != nil {
		c.debug("cluster: take-over failed", zap.Error(err))
		return false
	}
	resume := c.s.initialID // "" for none
	if prev.hasOriginID {
		resume = prev.originID
	}
	u := c.s.upstreamFrom(resume, sourceStream)
	if c.s.hub.assignIDs {
		_, _, _, epoch := c.cl.objects()
		u.ids = &idAssigner{epoch: epoch, seq: prev.proxySeq}
	}
	ls := newLogSink(w, prev)
	upstreamDone := make(chan struct{})
	commitDone, refreshDone := make(chan error, 1), make(chan error, 1)
	go func() {
		defer close(upstreamDone)
		u.run(ctx, ls)
		ls.close() // the committer writes what is left, the final answer included
	}()
	go func() { commitDone <- ls.commit(ctx) }()
	go func() { refreshDone <- w.refresh(ctx) }()
	select {
	case err = <-commitDone:
	case err = <-refreshDone:
	}
	cancel()
	ls.close()
	<-upstreamDone
	select {
	case <-commitDone:
	case <-refreshDone:
	}
	if errors.Is(err, errFenced) {
		metrics.clusterFenced.Inc()
		c.logger().Warn("cluster: another node took the stream over; this node's upstream closes", zap.String("stream", c.s.name))
	}
	over = errors.Is(err, errStreamOver)
	if !errors.Is(err, errFenced) && !errors.Is(err, errLeaseLost) {
		w.release()
	}
	return over
}
