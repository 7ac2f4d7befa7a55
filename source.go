package ssefanout

import (
	"context"
	"net/http"
)

// A source is what feeds a stream: it emits the stream's history entries
// and reports how the origin answered. The upstream (upstream.go), one
// request at a time to the origin, is the source of a single node; a
// catch-up for resuming clients and a cluster's shared log are others.
// Publishing, resuming and clients do not care which one feeds a stream.
type source interface {
	// run feeds sink until ctx ends, or until the origin's final answer.
	run(ctx context.Context, sink sink)
}

// sink is what a source feeds: a stream's history and state.
type sink interface {
	// answer reports how the origin answered an attempt. The first call
	// releases the clients waiting for the origin's first answer.
	answer(a answer)
	// append adds one history entry (an event, an id-only block or a
	// retry line), in the order the origin sent them.
	append(e entry)
}

// answer is the origin's answer to an upstream attempt.
type answer struct {
	state streamState
	// header is the origin's response headers to pass on, when live.
	header http.Header
	// final is the origin's permanent answer, when state is stateFinal.
	final *finalAnswer
	// past marks an answer replayed from a cluster log's history: its
	// state applies, but no upstream connection began or ended now.
	past bool
}
