package main

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// histogram is a concurrent log-linear histogram of durations with
// microsecond resolution below 128µs and under 1/64 relative error above.
type histogram struct {
	buckets [histBuckets]atomic.Uint64
	n       atomic.Int64
	max     atomic.Int64 // exact, in nanoseconds
}

const (
	histSubBits = 6
	histLinear  = 2 << histSubBits // values below this are their own bucket
	histBuckets = histLinear + 58*(1<<histSubBits)
)

func (h *histogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.buckets[bucketOf(uint64(d/time.Microsecond))].Add(1)
	h.n.Add(1)
	for {
		m := h.max.Load()
		if int64(d) <= m || h.max.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

func bucketOf(us uint64) int {
	if us < histLinear {
		return int(us)
	}
	shift := bits.Len64(us) - histSubBits - 1
	return histLinear + (shift-1)<<histSubBits + int(us>>shift) - 1<<histSubBits
}

// upperBound is the largest value, in microseconds, that falls in bucket i.
func upperBound(i int) uint64 {
	if i < histLinear {
		return uint64(i)
	}
	i -= histLinear
	shift := i>>histSubBits + 1
	m := uint64(i&(1<<histSubBits-1)) + 1<<histSubBits
	return (m+1)<<shift - 1
}

func (h *histogram) count() int64 { return h.n.Load() }

// quantile returns the upper bound of the bucket holding quantile q.
func (h *histogram) quantile(q float64) time.Duration {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	var seen uint64
	for i := range h.buckets {
		seen += h.buckets[i].Load()
		if seen >= rank {
			return min(time.Duration(upperBound(i))*time.Microsecond, time.Duration(h.max.Load()))
		}
	}
	return time.Duration(h.max.Load())
}
