package ssefanout

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// What a follower counts as the log's past: only what the log held when it
// began following, read once. A final answer written while its first
// consumer was being made, or while that read was late, is new to it, and
// ends its stream.
func TestLogPast(t *testing.T) {
	began := time.Now()
	past := &logPast{since: began, end: 5, read: true}
	msg := func(seq uint64, stored time.Time) *jetstream.MsgMetadata {
		return &jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: seq}, Timestamp: stored}
	}
	for _, tc := range []struct {
		name string
		md   *jetstream.MsgMetadata
		want bool
	}{
		{"held before the follower began", msg(5, began.Add(-time.Minute)), true},
		{"an older message", msg(1, began.Add(-time.Hour)), true},
		{"written after the first read", msg(6, began.Add(-time.Minute)), false},
		{"within the first read, but stored after the follower began (a late read)", msg(5, began.Add(time.Millisecond)), false},
	} {
		if got := past.holds(tc.md); got != tc.want {
			t.Errorf("%s: holds = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// lastOnly is a log of which a follower reads only the last sequence of
// its subject; every other method is left unimplemented.
type lastOnly struct {
	jetstream.Stream
	seq   uint64
	err   error
	reads int
}

func (l *lastOnly) GetLastMsgForSubject(context.Context, string) (*jetstream.RawStreamMsg, error) {
	l.reads++
	if l.err != nil {
		return nil, l.err
	}
	return &jetstream.RawStreamMsg{Sequence: l.seq}, nil
}

// The past is read once per stretch of following: a failed read is made
// again by the next consumer, but a consumer made after the first answer
// keeps it, whatever the log took since.
func TestLogPastIsReadOnce(t *testing.T) {
	ctx := context.Background()
	past := &logPast{since: time.Now()}
	log := &lastOnly{err: errors.New("nats: no responders available for request")}
	if err := past.learn(ctx, log, "s"); err == nil || past.read {
		t.Fatalf("a failed read: err %v, read %v; want the error, and the past still unknown", err, past.read)
	}
	log.err, log.seq = nil, 7
	if err := past.learn(ctx, log, "s"); err != nil || !past.read || past.end != 7 {
		t.Fatalf("the first answer: err %v, read %v, end %d; want the past to end at 7", err, past.read, past.end)
	}
	log.seq = 9 // a final answer written while the next consumer was made
	if err := past.learn(ctx, log, "s"); err != nil || past.end != 7 || log.reads != 2 {
		t.Fatalf("a later consumer: err %v, end %d after %d reads; want the past kept at 7, read twice in all", err, past.end, log.reads)
	}
	if past.holds(&jetstream.MsgMetadata{Sequence: jetstream.SequencePair{Stream: 9}, Timestamp: time.Now()}) {
		t.Fatal("the final answer written after the first read counts as the past")
	}

	// a subject with nothing in the log: the past is empty
	past, log = &logPast{since: time.Now()}, &lastOnly{err: jetstream.ErrMsgNotFound}
	if err := past.learn(ctx, log, "s"); err != nil || !past.read || past.end != 0 {
		t.Fatalf("an empty subject: err %v, read %v, end %d; want an empty past", err, past.read, past.end)
	}
}
