//go:build !linux

package ssefanout

import (
	"net"
	"sync/atomic"
)

// watchHangup calls onHangup once when the peer of tcp closes or resets
// the connection, from a goroutine parked in a read (what a client sends
// after its request is discarded). stop ends the watch; the goroutine
// returns once tcp is closed.
func watchHangup(tcp *net.TCPConn, onHangup func()) (stop func(), err error) {
	var stopped atomic.Bool
	go func() {
		var b [512]byte
		for {
			if _, err := tcp.Read(b[:]); err != nil {
				if !stopped.Load() {
					onHangup()
				}
				return
			}
		}
	}()
	return func() { stopped.Store(true) }, nil
}
