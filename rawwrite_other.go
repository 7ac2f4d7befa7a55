//go:build !unix

package ssefanout

import "errors"

// rawWrites is whether hijacked clients can be written with writeNow: not
// here, where every client is served through net/http.
const rawWrites = false

func writeNow(uintptr, []byte) (int, error) {
	return 0, errors.New("no raw socket writes on this platform")
}
