//go:build linux

package ssefanout

import (
	"errors"
	"net"
	"sync"
	"syscall"
)

// Hang-ups of clients whose sockets the module writes directly are found by
// one epoll instance of the module's own and one goroutine waiting on it,
// instead of a reader goroutine (2 KiB of stack or more) per client. The
// runtime's poller already watches these sockets, but tells only a
// goroutine blocked on one. The goroutine runs while sockets are watched.

// hangups is the process's watcher.
var hangups hangupWatcher

type hangupWatcher struct {
	mu      sync.Mutex
	running bool
	epfd    int
	wake    [2]int // a pipe whose read end is in the epoll set: stop when idle
	next    uint32
	watches map[uint32]*hangupWatch
}

// hangupWatch is one watched socket.
type hangupWatch struct {
	onHangup func()
	fired    bool
}

// wakeID is the epoll data of the wake pipe; sockets get other ids.
const wakeID = 0

// epollOneShot is EPOLLONESHOT, which package syscall types as an int.
const epollOneShot = 1 << 30

// watchHangup calls onHangup once when the peer of tcp closes or resets
// the connection; onHangup must not block. The returned stop must be
// called before tcp is closed; after it returns, onHangup is not called.
func watchHangup(tcp *net.TCPConn, onHangup func()) (stop func(), err error) {
	rc, err := tcp.SyscallConn()
	if err != nil {
		return nil, err
	}
	w := &hangups
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.running {
		if err := w.startLocked(); err != nil {
			return nil, err
		}
	}
	id := w.next
	for _, used := w.watches[id]; used || id == wakeID; _, used = w.watches[id] {
		id++
	}
	w.next = id + 1
	// one-shot: reported once, then disabled until removed, so that a
	// hang-up is never reported again while its owner cleans up
	ev := syscall.EpollEvent{Events: syscall.EPOLLRDHUP | syscall.EPOLLHUP | syscall.EPOLLERR | epollOneShot, Fd: int32(id)}
	epfd := w.epfd
	var ctlErr error
	if err := rc.Control(func(fd uintptr) { ctlErr = syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev) }); err != nil {
		ctlErr = err
	}
	if ctlErr != nil {
		w.idleLocked()
		return nil, ctlErr
	}
	w.watches[id] = &hangupWatch{onHangup: onHangup}
	return func() {
		// removed while the descriptor is surely open: by number, after
		// a close, it could name another socket
		_ = rc.Control(func(fd uintptr) { _ = syscall.EpollCtl(epfd, syscall.EPOLL_CTL_DEL, int(fd), nil) })
		w.mu.Lock()
		defer w.mu.Unlock()
		delete(w.watches, id)
		w.idleLocked()
	}, nil
}

func (w *hangupWatcher) startLocked() error {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	if err := syscall.Pipe2(w.wake[:], syscall.O_NONBLOCK|syscall.O_CLOEXEC); err != nil {
		syscall.Close(epfd)
		return err
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: wakeID}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, w.wake[0], &ev); err != nil {
		syscall.Close(epfd)
		syscall.Close(w.wake[0])
		syscall.Close(w.wake[1])
		return err
	}
	w.epfd, w.running = epfd, true
	if w.watches == nil {
		w.watches = map[uint32]*hangupWatch{}
	}
	go w.run(epfd)
	return nil
}

// idleLocked wakes the goroutine when nothing is watched, so that it ends.
func (w *hangupWatcher) idleLocked() {
	if len(w.watches) == 0 && w.running {
		_, _ = syscall.Write(w.wake[1], []byte{0})
	}
}

// run waits for hang-ups until nothing is watched. It holds an OS thread
// while blocked, not a P.
func (w *hangupWatcher) run(epfd int) {
	events := make([]syscall.EpollEvent, 128)
	for {
		n, err := syscall.EpollWait(epfd, events, -1)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		w.mu.Lock()
		if err != nil {
			w.stopLocked()
			w.mu.Unlock()
			return
		}
		for _, ev := range events[:n] {
			if ev.Fd == wakeID {
				var buf [64]byte
				_, _ = syscall.Read(w.wake[0], buf[:])
				continue
			}
			// called under the lock, so that once a stop has returned
			// its callback cannot run; callbacks must not block
			if h := w.watches[uint32(ev.Fd)]; h != nil && !h.fired {
				h.fired = true
				h.onHangup()
			}
		}
		idle := len(w.watches) == 0
		if idle {
			w.stopLocked()
		}
		w.mu.Unlock()
		if idle {
			return
		}
	}
}

func (w *hangupWatcher) stopLocked() {
	syscall.Close(w.epfd)
	syscall.Close(w.wake[0])
	syscall.Close(w.wake[1])
	w.running = false
}
