// Package rawwrite makes one write(2) to a non-blocking socket, as cheaply
// as the platform allows. The plugin writes its hijacked clients with it,
// and the load tool's write floor writes its clients with it too, so that
// the floor stays the least a proxy can do, by construction.
package rawwrite
