package main

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestHistogramBuckets(t *testing.T) {
	prev := -1
	for _, us := range []uint64{0, 1, 127, 128, 129, 255, 256, 1000, 1 << 20, 1<<40 + 12345, 1<<63 + 5} {
		i := bucketOf(us)
		if i < prev || i >= histBuckets {
			t.Fatalf("bucketOf(%d) = %d, previous %d", us, i, prev)
		}
		prev = i
		ub := upperBound(i)
		if ub < us || (us >= histLinear && float64(ub-us) > float64(us)/64) {
			t.Errorf("value %d: bucket %d upper bound %d", us, i, ub)
		}
		if i > 0 && upperBound(i-1) >= us {
			t.Errorf("value %d: previous bucket's upper bound %d is not below it", us, upperBound(i-1))
		}
	}
}

func TestHistogramQuantile(t *testing.T) {
	var h histogram
	for i := 1; i <= 1000; i++ {
		h.record(time.Duration(i) * time.Millisecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Millisecond}, {0.99, 990 * time.Millisecond}, {1, time.Second}} {
		got := h.quantile(c.q)
		if got < c.want || float64(got-c.want) > float64(c.want)/64 {
			t.Errorf("quantile(%v) = %v, want about %v", c.q, got, c.want)
		}
	}
}

func TestRead(t *testing.T) {
	l := &load{}
	l.measuring.Store(true)
	ts := time.Now().Add(-5 * time.Millisecond).UnixNano()
	stream := ": hi\r\n" +
		"id: 1\ndata: {\"ts\":" + strconv.FormatInt(ts, 10) + "}\n\n" +
		"id: 2\ndata: a\ndata: b\n\n" +
		"id: 5\nretry: 10\ndata: x\n\n" + // gap
		"id: 5\n\n" + // id-only block: no event
		"id: 4\ndata: y\r\n\r\n" + // repeat
		"data: " + strings.Repeat("z", 40000) + "\n\n"
	var res clientResult
	if err := l.read(strings.NewReader(stream), &res); err == nil || err.Error() != "EOF" {
		t.Fatalf("read: %v", err)
	}
	if res.events != 5 || !res.gap || !res.repeat {
		t.Errorf("got %+v", res)
	}
	if l.lat.count() != 1 || l.lat.quantile(0.5) < 5*time.Millisecond {
		t.Errorf("latency: %d samples, p50 %v", l.lat.count(), l.lat.quantile(0.5))
	}
}
