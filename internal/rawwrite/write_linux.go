package rawwrite

import (
	"syscall"
	"unsafe"
)

// Supported is whether Write can be used on this platform.
const Supported = true

// Write makes one write(2) to a non-blocking socket. It is a raw system
// call, without the scheduler's hand-off around a call that may block: a
// non-blocking write returns at once, and the hand-off, with the runtime
// retaking the processor from writes that took over 20 µs, cost 13% of
// the CPU per delivery at 10,000 clients. The caller keeps the descriptor
// from being closed, or reused, during the call (the plugin holds the
// socket through its RawConn). It returns what was written, with syscall.EAGAIN when the
// socket's buffer is full.
func Write(fd uintptr, p []byte) (int, error) {
	for {
		n, _, errno := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
		switch errno {
		case 0:
			return int(n), nil
		case syscall.EINTR:
			continue
		}
		return 0, errno
	}
}
