//go:build !linux

package main

import (
	"context"
	"errors"
)

// poller is the Linux epoll reader; elsewhere every stream has its own
// goroutine (-reader goroutine).
type poller struct{}

func newPoller(*load) (*poller, error) {
	return nil, errors.New("the epoll reader needs Linux")
}

func (*poller) add(*rawStream, *eventParser) error { return errors.New("no poller") }
func (*poller) run(context.Context)                {}
func (*poller) wait()                              {}
