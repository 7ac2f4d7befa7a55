package main

import (
	"bytes"
	"fmt"
	"path/filepath"
	"text/template"
)

// nginxConfig is what an nginx.conf for one run is made from.
type nginxConfig struct {
	Dir         string // the run's directory: pid file, logs, temp paths
	Port        int    // where clients connect, on 127.0.0.1
	OriginPort  int    // the benchmark origin (proxy_pass)
	NchanModule string // path of ngx_nchan_module.so; empty: proxy_pass
	MaxFiles    int    // worker_rlimit_nofile
}

// Connections is worker_connections: twice the descriptors, since nchan
// counts connections of its own that hold none (with as many connections as
// descriptors, it turns clients away from about 18,700 on 20,000).
func (c nginxConfig) Connections() int { return 2 * c.MaxFiles }

// Channel and locations of the nchan peer.
const (
	nchanChannel   = "bench"
	nchanPublish   = "/pub"
	nchanSubscribe = "/sub"
)

var nginxTemplate = template.Must(template.New("nginx.conf").Parse(`# nginx.conf written by ssebench for one run.
# One worker (pinned by the taskset the master runs under), in the foreground
# so that the harness owns the master's PID; everything in the run's directory.
worker_processes 1;
daemon off;
master_process on;
pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/error.log warn;
worker_rlimit_nofile {{.MaxFiles}};
{{- if .NchanModule}}
load_module {{.NchanModule}};
{{- end}}

events {
	worker_connections {{.Connections}};
	multi_accept on;
}

http {
	access_log off;
	client_body_temp_path {{.Dir}}/tmp/body;
	proxy_temp_path {{.Dir}}/tmp/proxy;
	fastcgi_temp_path {{.Dir}}/tmp/fastcgi;
	uwsgi_temp_path {{.Dir}}/tmp/uwsgi;
	scgi_temp_path {{.Dir}}/tmp/scgi;
	keepalive_requests 1000000;
	keepalive_timeout 1h;
	send_timeout 1h;

	server {
		listen 127.0.0.1:{{.Port}} backlog=4096;
{{- if .NchanModule}}

		# the origin POSTs each event's data here
		location = ` + nchanPublish + ` {
			nchan_publisher;
			nchan_channel_id ` + nchanChannel + `;
			nchan_message_buffer_length 1000;
			nchan_message_timeout 5m;
		}

		# clients, in EventSource mode; new ones start at the next message
		location = ` + nchanSubscribe + ` {
			nchan_subscriber eventsource;
			nchan_channel_id ` + nchanChannel + `;
			nchan_subscriber_first_message newest;
			nchan_subscriber_timeout 0;
		}
{{- else}}

		location / {
			proxy_pass http://127.0.0.1:{{.OriginPort}};
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_buffering off;
			proxy_read_timeout 1h;
		}
{{- end}}
	}
}
`))

// render writes the configuration.
func (c nginxConfig) render() ([]byte, error) {
	var b bytes.Buffer
	if err := nginxTemplate.Execute(&b, c); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// caddyConfig is what a Caddyfile for one run is made from.
type caddyConfig struct {
	Port       int
	OriginPort int
	Peer       string // peerFanout, peerFanoutStatus or peerReverseProxy
	TLS        bool   // tls internal, HTTP/1.1 and HTTP/2
	Storage    string // certificate storage (the internal CA), for TLS
}

var caddyTemplate = template.Must(template.New("Caddyfile").Parse(`# Caddyfile written by ssebench for one run.
{
	admin off
	persist_config off
	grace_period 2s
{{- if .TLS}}
	auto_https disable_redirects
	skip_install_trust
	storage file_system {{.Storage}}
	servers {
		protocols h1 h2
	}
{{- else}}
	auto_https off
{{- end}}
}

{{if .TLS}}https://127.0.0.1:{{.Port}}{{else}}http://127.0.0.1:{{.Port}}{{end}} {
	bind 127.0.0.1
{{- if .TLS}}
	tls internal
{{- end}}
{{- if eq .Peer "` + peerFanoutStatus + `"}}
	handle /status {
		sse_fanout_status
	}
{{- end}}
{{- if or (eq .Peer "` + peerFanout + `") (eq .Peer "` + peerFanoutStatus + `")}}
	sse_fanout http://127.0.0.1:{{.OriginPort}}
{{- else}}
	reverse_proxy 127.0.0.1:{{.OriginPort}} {
		flush_interval -1
	}
{{- end}}
}
`))

func (c caddyConfig) render() ([]byte, error) {
	if !caddyPeer(c.Peer) {
		return nil, fmt.Errorf("caddy config for peer %q: want %s, %s or %s", c.Peer, peerFanout, peerFanoutStatus, peerReverseProxy)
	}
	if c.TLS && !filepath.IsAbs(c.Storage) {
		return nil, fmt.Errorf("caddy config: TLS needs an absolute storage path, got %q", c.Storage)
	}
	var b bytes.Buffer
	if err := caddyTemplate.Execute(&b, c); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}
