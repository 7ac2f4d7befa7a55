//go:build unix && !linux

package rawwrite

import "syscall"

// Supported is whether Write can be used on this platform.
const Supported = true

// Write makes one write(2) to a non-blocking socket. It returns what was
// written, with syscall.EAGAIN when the socket's buffer is full.
func Write(fd uintptr, p []byte) (int, error) {
	for {
		n, err := syscall.Write(int(fd), p)
		if err == syscall.EINTR {
			continue
		}
		return max(n, 0), err
	}
}
