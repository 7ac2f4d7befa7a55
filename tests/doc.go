// Package tests holds the end-to-end tests and tools of sse_fanout that
// need dependencies the plugin itself does not: a real browser (Chromium
// through chromedp), the NATS server, the load tools. It is a module of
// its own, so that a user's `xcaddy build` pulls only what the plugin
// needs. Its tests see the module only from outside: through Caddy, its
// admin API and its metrics.
package tests
