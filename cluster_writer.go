package ssefanout

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// The holder's side of the log: fenced writes, the lease's refresh, and
// the batching of what the origin sends.

// logWriter writes a holder's messages to the stream's subject, fenced:
// each publish expects the subject's last sequence to be the one this
// holder wrote last, and carries the message id <lease revision>-<batch>,
// so that a holder whose lease lapsed is refused, and a publish whose
// answer was lost is recognised when retried.
type logWriter struct {
	c        *clusterSource
	leaseRev uint64 // the lease's revision when taken: the message ids' prefix
	kvRev    uint64 // the lease key's revision now, for its refresh
	last     uint64 // the subject's last sequence, as this holder knows it
	batch    uint64
}

// logPosition is where the log stands: the origin's last committed id and,
// under assign_ids, the last proxy sequence.
type logPosition struct {
	originID    string
	hasOriginID bool
	proxySeq    uint64
}

func positionOf(h nats.Header) logPosition {
	var p logPosition
	if v, ok := h[hdrOriginID]; ok && len(v) > 0 {
		p.originID, p.hasOriginID = v[0], true
	}
	p.proxySeq, _ = strconv.ParseUint(h.Get(hdrProxySeq), 10, 64)
	return p
}

// takeOver reads where the log stands and appends a take-over marker, so
// that a stale holder's next write is refused.
func (w *logWriter) takeOver(ctx context.Context) (logPosition, error) {
	log, _, _, _ := w.c.cl.objects()
	for ctx.Err() == nil {
		var prev logPosition
		m, err := log.GetLastMsgForSubject(ctx, w.c.subject)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
			w.last = 0
		case err != nil:
			return prev, err
		default:
			w.last = m.Sequence
			prev = positionOf(m.Header)
		}
		hdr := w.header(prev)
		hdr.Set(hdrTakeover, "1")
		err = w.append(ctx, nil, hdr)
		if errors.Is(err, errFenced) {
			continue // a stale holder wrote in between: read again
		}
		if err == nil && w.last > 1 {
			metrics.clusterTakeovers.Inc()
		}
		return prev, err
	}
	return logPosition{}, ctx.Err()
}

// header is a message's headers, with where the log stands after it.
func (w *logWriter) header(p logPosition) nats.Header {
	_, _, _, epoch := w.c.cl.objects()
	h := nats.Header{}
	h.Set(hdrDigest, w.c.digest)
	h.Set(hdrEpoch, epoch)
	h.Set(hdrNode, nodeID)
	if p.hasOriginID {
		h[hdrOriginID] = []string{p.originID}
	}
	if p.proxySeq > 0 {
		h.Set(hdrProxySeq, strconv.FormatUint(p.proxySeq, 10))
	}
	return h
}

// append publishes one message, fenced. A "wrong last sequence" answer is
// told apart by reading the subject's last message: ours (the answer was
// lost), unchanged (the server had not yet cleared our previous publish:
// retry), or another's (fenced).
func (w *logWriter) append(ctx context.Context, body []byte, hdr nats.Header) error {
	log, _, _, _ := w.c.cl.objects()
	id := fmt.Sprintf("%d-%d", w.leaseRev, w.batch)
	msg := &nats.Msg{Subject: w.c.subject, Data: body, Header: hdr}
	for backoff := 10 * time.Millisecond; ; backoff = min(2*backoff, 200*time.Millisecond) {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		pa, err := w.c.cl.link.js.PublishMsg(pctx, msg, jetstream.WithExpectLastSequencePerSubject(w.last), jetstream.WithMsgID(id))
		cancel()
		switch {
		case err == nil:
			w.last, w.batch = pa.Sequence, w.batch+1
			w.c.commitErrSince.Store(0)
			return nil
		case wrongLast(err):
			gctx, cancel := context.WithTimeout(ctx, time.Second)
			m, gerr := log.GetLastMsgForSubject(gctx, w.c.subject)
			cancel()
			switch {
			case gerr != nil:
			case m.Header.Get(jetstream.MsgIDHeader) == id:
				w.last, w.batch = m.Sequence, w.batch+1
				return nil
			case m.Sequence != w.last:
				return errFenced
			}
		case apiCode(err) == 10158: // our retry met our first try still in process
		case ctx.Err() != nil:
			return ctx.Err()
		default: // a timeout or no leader during a fail-over: the same message again
			w.c.commitErrSince.CompareAndSwap(0, time.Now().UnixNano())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
	}
}

// refresh keeps the lease, every third of it, until ctx ends; it fails
// with errFenced when another node has it, and errLeaseLost when no
// refresh got through for a whole lease (this node no longer knows that
// it holds it).
func (w *logWriter) refresh(ctx context.Context) error {
	lease := time.Duration(w.c.cl.cfg.Lease)
	t := time.NewTicker(lease / 3)
	defer t.Stop()
	last := time.Now()
	subject := "$KV." + w.c.cl.leaseBucket + "." + w.c.digest
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, lease/3)
		pa, err := w.c.cl.link.js.PublishMsg(pctx, &nats.Msg{Subject: subject, Data: []byte(nodeID)},
			jetstream.WithExpectLastSequencePerSubject(w.kvRev), jetstream.WithMsgTTL(lease))
		cancel()
		switch {
		case err == nil:
			w.kvRev, last = pa.Sequence, time.Now()
		case wrongLast(err):
			// did our refresh land and its answer get lost? the leader knows
			seq, node, lerr := w.c.cl.leaderRead(ctx, "KV_"+w.c.cl.leaseBucket, subject)
			if lerr == nil && node == nodeID && seq > w.kvRev {
				w.kvRev, last = seq, time.Now()
				continue
			}
			if lerr == nil && node != nodeID {
				return errFenced // another node holds it now
			}
			return errLeaseLost
		}
		if time.Since(last) > lease {
			return errLeaseLost
		}
	}
}

// release gives the lease up, if it is still this holder's.
func (w *logWriter) release() {
	_, kv, _, _ := w.c.cl.objects()
	if kv == nil || !w.c.cl.link.connected() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = kv.Delete(ctx, w.c.digest, jetstream.LastRevision(w.kvRev))
}

// leaderRead reads the last message of subject in stream from the
// stream's leader, never a replica that may lag: its sequence and data.
func (c *clusterHub) leaderRead(ctx context.Context, stream, subject string) (uint64, string, error) {
	req, _ := json.Marshal(map[string]string{"last_by_subj": subject})
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	m, err := c.link.nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+stream, req)
	if err != nil {
		return 0, "", err
	}
	var resp struct {
		Message *struct {
			Seq  uint64 `json:"seq"`
			Data []byte `json:"data"`
		} `json:"message"`
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return 0, "", err
	}
	if resp.Error != nil {
		return 0, "", resp.Error
	}
	if resp.Message == nil {
		return 0, "", errBadRecord
	}
	return resp.Message.Seq, string(resp.Message.Data), nil
}

// wrongLast reports a refused expected-last-sequence: 10071, or 10164
// while another publish to the subject is in process.
func wrongLast(err error) bool {
	c := apiCode(err)
	return c == jetstream.JSErrCodeStreamWrongLastSequence || c == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

func apiCode(err error) jetstream.ErrorCode {
	var ae *jetstream.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode
	}
	return 0
}

// logSink is the holder upstream's sink: what the origin sends is queued
// and committed to the log in batches (group commit: whatever arrived
// while a publish was in flight goes in the next message), so that a
// stream's event rate is not bound by one round trip per event.
type logSink struct {
	w     *logWriter
	prev  logPosition // where the log stood at the take-over
	final atomic.Bool

	mu      sync.Mutex
	queue   []logRecord
	bytes   int
	pos     logPosition // the origin's position after the queued records
	checked bool        // the take-over gap was looked at
	closed  bool
	wake    chan struct{}
	space   chan struct{}
}

func newLogSink(w *logWriter, prev logPosition) *logSink {
	return &logSink{w: w, prev: prev, pos: prev, wake: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// append queues an entry, waiting while the backlog is full: the origin
// is then read no faster than the log takes it.
func (ls *logSink) append(e entry) {
	ls.mu.Lock()
	for ls.bytes > logBacklog && !ls.closed {
		ls.mu.Unlock()
		<-ls.space
		ls.mu.Lock()
	}
	if e.kind == entryEvent && ls.w.c.s.hub.assignIDs {
		if i := strings.LastIndexByte(e.id, '-'); i >= 0 {
			ls.pos.proxySeq, _ = strconv.ParseUint(e.id[i+1:], 10, 64)
		}
	}
	ls.queue = append(ls.queue, logRecord{entry: e, pos: ls.pos})
	ls.bytes += len(e.frame)
	ls.mu.Unlock()
	signal(ls.wake)
}

// answer queues the origin's answer to an attempt.
func (ls *logSink) answer(a answer) {
	if a.final != nil {
		ls.final.Store(true)
	}
	ls.mu.Lock()
	ls.queue = append(ls.queue, logRecord{answer: &a, pos: ls.pos})
	ls.mu.Unlock()
	signal(ls.wake)
}

// originID records the origin's committed id before the entry it comes
// with (see upstream.read). The first one after a take-over tells, for
// numeric ids, how many events the origin sent that nobody committed (an
// origin that ignores Last-Event-ID starts from its live head).
func (ls *logSink) originID(id string) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.pos.originID, ls.pos.hasOriginID = id, true
	if ls.checked {
		return
	}
	ls.checked = true
	if !ls.prev.hasOriginID {
		return
	}
	before, err1 := strconv.ParseUint(ls.prev.originID, 10, 64)
	now, err2 := strconv.ParseUint(id, 10, 64)
	if err1 == nil && err2 == nil && now > before+1 {
		metrics.clusterTakeoverGap.Add(float64(now - before - 1))
	}
}

// close says that the upstream ended: what is queued is the last.
func (ls *logSink) close() {
	ls.mu.Lock()
	ls.closed = true
	ls.mu.Unlock()
	signal(ls.wake)
	signal(ls.space)
}

// commit writes what is queued, in messages that NATS takes (below its
// max_payload), one publish at a time, until the upstream ended and all
// is written (errStreamOver after a final answer), or a write is refused.
func (ls *logSink) commit(ctx context.Context) error {
	limit := int(ls.w.c.cl.link.nc.MaxPayload()) - maxLogOverhead
	var body []byte
	for {
		ls.mu.Lock()
		queue, closed := ls.queue, ls.closed
		ls.queue, ls.bytes = nil, 0
		ls.mu.Unlock()
		signal(ls.space)
		for len(queue) > 0 {
			body = body[:0]
			var pos logPosition // where the origin stands after the message
			n := 0
			for ; n < len(queue); n++ {
				r := queue[n]
				if r.answer == nil && recordLen(&r.entry) > limit {
					metrics.eventsSkipped.Inc()
					ls.w.c.logger().Warn("cluster: skipped an event too large for NATS's max_payload; raise max_payload", zap.String("stream", ls.w.c.s.name), zap.Int("size", len(r.entry.frame)))
					continue
				}
				if n > 0 && len(body)+recordLen(&r.entry) > limit {
					break
				}
				body = appendRecord(body, r)
				pos = r.pos
			}
			queue = queue[n:]
			if len(body) == 0 {
				continue
			}
			if err := ls.w.append(ctx, body, ls.w.header(pos)); err != nil {
				return err
			}
		}
		if closed {
			if ls.final.Load() {
				return errStreamOver
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ls.wake:
		}
	}
}
