//go:build unix && !linux

package ssefanout

import "syscall"

// rawWrites is whether hijacked clients can be written with writeNow.
const rawWrites = true

// writeNow makes one write(2) to a non-blocking socket. It returns what was
// written, with syscall.EAGAIN when the socket's buffer is full.
func writeNow(fd uintptr, p []byte) (int, error) {
	for {
		n, err := syscall.Write(int(fd), p)
		if err == syscall.EINTR {
			continue
		}
		return max(n, 0), err
	}
}
