package main

import (
	"io"
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	flagOutput = io.Discard // the flag tests' errors and usage
	os.Exit(m.Run())
}
