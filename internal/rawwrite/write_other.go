//go:build !unix

package rawwrite

import "errors"

// Supported is whether Write can be used on this platform: not here.
const Supported = false

// Write fails: see Supported.
func Write(uintptr, []byte) (int, error) {
	return 0, errors.New("no raw socket writes on this platform")
}
