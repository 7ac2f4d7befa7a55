package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// fewReady is a wake-up's count of ready streams under which the poller
// lets more become ready before it asks again.
const fewReady = 64

// poller reads many plain HTTP/1.1 streams from one goroutine with
// level-triggered epoll: one read(2) per ready socket per wake-up, into one
// shared buffer.
type poller struct {
	l    *load
	epfd int
	byFD []atomic.Pointer[rawClient]
	buf  []byte
	done chan struct{} // closed when run has returned

	mu     sync.Mutex
	closed bool // run has closed every stream: add refuses new ones
}

// rawClient is one stream the poller reads.
type rawClient struct {
	fd      int
	chunked bool
	dec     chunkDecoder
	parser  *eventParser
}

func newPoller(l *load) (*poller, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return nil, err
	}
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	return &poller{
		l:    l,
		epfd: epfd,
		byFD: make([]atomic.Pointer[rawClient], min(rl.Cur, 1<<20)+64),
		buf:  make([]byte, 64<<10),
		done: make(chan struct{}),
	}, nil
}

// add hands a stream to the poller, after accounting for the body bytes
// that came with its head.
func (pl *poller) add(s *rawStream, p *eventParser) error {
	c := &rawClient{fd: s.fd, chunked: s.chunked, parser: p}
	if err := c.consume(s.head, s.at); err != nil {
		syscall.Close(s.fd)
		return err
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	switch {
	case pl.closed:
		syscall.Close(s.fd)
		return errors.New("run ended")
	case s.fd >= len(pl.byFD):
		syscall.Close(s.fd)
		return fmt.Errorf("descriptor %d is above the open files limit", s.fd)
	}
	pl.byFD[s.fd].Store(c)
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(s.fd)}
	if err := syscall.EpollCtl(pl.epfd, syscall.EPOLL_CTL_ADD, s.fd, &ev); err != nil {
		pl.byFD[s.fd].Store(nil)
		syscall.Close(s.fd)
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	return nil
}

// run reads the streams until ctx ends, then closes them all.
func (pl *poller) run(ctx context.Context) {
	defer close(pl.done)
	defer pl.closeAll()
	events := make([]syscall.EpollEvent, 1024)
	for ctx.Err() == nil {
		n, err := syscall.EpollWait(pl.epfd, events, 100)
		if err != nil {
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			fmt.Fprintln(os.Stderr, "sseload: epoll_wait:", err)
			return
		}
		for i := range events[:n] {
			if c := pl.byFD[events[i].Fd].Load(); c != nil {
				pl.read(ctx, c)
			}
		}
		if n < fewReady && pl.l.opts.coalesce > 0 {
			time.Sleep(pl.l.opts.coalesce)
		}
	}
}

// wait returns once run has returned.
func (pl *poller) wait() { <-pl.done }

// read makes one read from a ready stream.
func (pl *poller) read(ctx context.Context, c *rawClient) {
	n, errno := rawRead(c.fd, pl.buf)
	now := time.Now()
	switch {
	case errno == syscall.EAGAIN || errno == syscall.EINTR:
		return
	case errno != 0:
		pl.drop(ctx, c, errno)
	case n == 0:
		pl.drop(ctx, c, io.EOF)
	default:
		if err := c.consume(pl.buf[:n], now); err != nil {
			pl.drop(ctx, c, err)
		}
	}
}

// rawRead is read(2) on a non-blocking descriptor, without the scheduler
// hand-off of syscall.Read (it never blocks).
func rawRead(fd int, p []byte) (int, syscall.Errno) {
	n, _, errno := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(n), errno
}

// consume parses bytes read from the stream at now; io.EOF after the
// last chunk.
func (c *rawClient) consume(b []byte, now time.Time) error {
	var end error
	if c.chunked {
		b, end = c.dec.decode(b)
	}
	if err := c.parser.feed(b, now); err != nil {
		return err
	}
	return end
}

// drop stops reading a stream that ended or failed.
func (pl *poller) drop(ctx context.Context, c *rawClient, err error) {
	_ = syscall.EpollCtl(pl.epfd, syscall.EPOLL_CTL_DEL, c.fd, nil)
	pl.byFD[c.fd].Store(nil)
	syscall.Close(c.fd)
	if ctx.Err() == nil {
		pl.l.endedEarly(c.parser.res, err)
	}
}

func (pl *poller) closeAll() {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.closed = true
	for i := range pl.byFD {
		if c := pl.byFD[i].Swap(nil); c != nil {
			syscall.Close(c.fd)
		}
	}
	syscall.Close(pl.epfd)
}
