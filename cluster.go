package ssefanout

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Many nodes, one upstream per stream: handlers of several Caddy nodes
// with the same cluster settings share their streams through NATS
// JetStream. Per stream, a lease in a KV bucket picks the node that holds
// the one upstream connection; the holder appends what the origin sends to
// the stream's subject in a JetStream stream (the log), fenced so that a
// holder whose lease lapsed cannot write; every node, the holder included,
// feeds its history from the log. The cluster is an optimisation, never a
// dependency of the live feed: a node that cannot reach NATS serves its
// clients from its own upstream (the fall-back) and rejoins when NATS is
// back.

// ClusterConfig makes this handler one of several Caddy nodes that share
// one upstream connection per stream. Handlers of all nodes with the same
// settings share their streams.
type ClusterConfig struct {
	// NATS is the NATS JetStream cluster that the nodes share.
	NATS *NATSConfig `json:"nats,omitempty"`
}

// NATSConfig says how to reach NATS and how to use it.
type NATSConfig struct {
	// The NATS server URLs, e.g. `nats://10.0.0.1:4222`. Required.
	URLs []string `json:"urls,omitempty"`

	// The name that namespaces everything this deployment writes to NATS
	// (its JetStream stream, KV buckets and subjects): deployments that
	// share a NATS cluster need different names. Letters, digits, `_` and
	// `-`. Default: `sse_fanout`.
	Name string `json:"name,omitempty"`

	// A NATS credentials file (`.creds`), for servers that require one.
	Credentials string `json:"credentials,omitempty"`

	// TLS to NATS: a CA file to trust, and a client certificate and key
	// for servers that verify clients. Any of them turns TLS on.
	TLSCA   string `json:"tls_ca,omitempty"`
	TLSCert string `json:"tls_cert,omitempty"`
	TLSKey  string `json:"tls_key,omitempty"`

	// How long a node's hold on a stream lasts without a refresh (it
	// refreshes every third of it): when the holding node dies, another
	// takes over after about this long. A NATS leader crash (4 to 9 s of
	// election) outlasts a short lease: fencing keeps that safe, and it
	// costs a hand-over (the origin sees a new connection, asked with the
	// last committed Last-Event-ID). Default: 3s.
	Lease caddy.Duration `json:"lease,omitempty"`

	// How many NATS servers keep each message: 3 on a production
	// cluster, 1 with a single server. Default: 1.
	Replicas int `json:"replicas,omitempty"`

	// How long the log keeps a stream's messages. Default: 24h.
	MaxAge caddy.Duration `json:"max_age,omitempty"`

	// The most bytes the log keeps for all streams, reserved up front on
	// every replica. Default: 0 (no limit but the per-stream bound of
	// `history` messages and max_age).
	MaxBytes int64 `json:"max_bytes,omitempty"`

	// Turn the fall-back off: a node that cannot reach NATS ends its
	// streams instead of opening upstream connections of its own, so that
	// EventSources reconnect and the load balancer moves them. Default:
	// the fall-back is on (the origin then sees one connection per stream
	// per node cut off).
	NoFallback bool `json:"no_fallback,omitempty"`
}

// Defaults and bounds of the cluster.
const (
	defaultClusterName = "sse_fanout"
	defaultLease       = 3 * time.Second
	defaultLogMaxAge   = 24 * time.Hour
	// rejoinAfter is how long NATS must answer again before a node in
	// fall-back rejoins.
	rejoinAfter = time.Second
	// logBacklog bounds what a holder has read from the origin and not yet
	// committed to the log: past it, the origin is read no faster than
	// the log takes it.
	logBacklog = 8 << 20
)

var clusterName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// setDefaults fills in what was left out.
func (c *NATSConfig) setDefaults() {
	setDefault(&c.Name, defaultClusterName)
	setDefault(&c.Lease, caddy.Duration(defaultLease))
	setDefault(&c.Replicas, 1)
	setDefault(&c.MaxAge, caddy.Duration(defaultLogMaxAge))
}

// validate checks the settings, after defaults.
func (c *NATSConfig) validate() error {
	_, err := c.problem()
	return err
}

// problem is validate's answer with the option that has to change (""
// for the URLs), so that the Caddyfile can point at that option's line.
func (c *NATSConfig) problem() (option string, err error) {
	switch {
	case len(c.URLs) == 0:
		return "", errors.New("cluster nats: at least one NATS URL is required, e.g. nats://127.0.0.1:4222")
	case !clusterName.MatchString(c.Name):
		return "name", fmt.Errorf("cluster nats: name %q must be 1 to 64 letters, digits, '_' or '-' (it names NATS subjects and buckets)", c.Name)
	case c.Lease < caddy.Duration(time.Second):
		return "lease", fmt.Errorf("cluster nats: lease must be at least 1s (it is refreshed every third of it), got %v", time.Duration(c.Lease))
	case c.Replicas < 1 || c.Replicas > 5:
		return "replicas", fmt.Errorf("cluster nats: replicas must be between 1 and 5, got %d", c.Replicas)
	case c.MaxAge < 0:
		return "max_age", errors.New("cluster nats: max_age must not be negative")
	case c.MaxBytes < 0:
		return "max_bytes", errors.New("cluster nats: max_bytes must not be negative")
	case c.TLSCert == "" && c.TLSKey != "":
		return "tls_key", errors.New("cluster nats: tls_cert and tls_key go together")
	case c.TLSCert != "" && c.TLSKey == "":
		return "tls_cert", errors.New("cluster nats: tls_cert and tls_key go together")
	}
	for _, u := range c.URLs {
		if !strings.Contains(u, "://") {
			return "", fmt.Errorf("cluster nats: %q is not a URL like nats://host:4222", u)
		}
	}
	return "", nil
}

// nodeID names this process in the cluster: random, new at each start.
var nodeID = func() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}()

// natsLinks holds one NATS connection per set of servers, credentials and
// TLS, shared by every handler that names them and kept across reloads.
var natsLinks = caddy.NewUsagePool()

// natsLink is a NATS connection that reconnects by itself, forever.
type natsLink struct {
	nc *nats.Conn
	js jetstream.JetStream

	mu sync.Mutex
	// reconnected is closed, and replaced, each time the connection comes
	// back: the log's followers then make their consumers again (see
	// clusterSource.consume)
	reconnected chan struct{}
}

// linkKey identifies a NATS connection.
func (c *NATSConfig) linkKey() string {
	b, _ := json.Marshal([]any{c.URLs, c.Credentials, c.TLSCA, c.TLSCert, c.TLSKey})
	return string(b)
}

// dialNATS connects to NATS, or starts trying to: NATS being unreachable
// is not an error (the node starts in fall-back).
func dialNATS(c *NATSConfig, logger *zap.Logger) (*natsLink, error) {
	link := &natsLink{reconnected: make(chan struct{})}
	opts := []nats.Option{
		nats.Name("caddy-sse-fanout " + nodeID),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.ReconnectJitter(100*time.Millisecond, time.Second),
		nats.RetryOnFailedConnect(true),
		nats.Timeout(time.Second),
		nats.PingInterval(2 * time.Second),
		nats.MaxPingsOutstanding(2),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			logger.Warn("NATS connection lost; streams fall back to their own upstreams if it stays lost", zap.Error(err))
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			logger.Info("NATS connection back", zap.String("server", nc.ConnectedUrlRedacted()))
			link.mu.Lock()
			close(link.reconnected)
			link.reconnected = make(chan struct{})
			link.mu.Unlock()
		}),
	}
	if c.Credentials != "" {
		opts = append(opts, nats.UserCredentials(c.Credentials))
	}
	if c.TLSCA != "" {
		opts = append(opts, nats.RootCAs(c.TLSCA))
	}
	if c.TLSCert != "" {
		opts = append(opts, nats.ClientCert(c.TLSCert, c.TLSKey))
	}
	nc, err := nats.Connect(strings.Join(c.URLs, ","), opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to NATS: %v", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("connecting to NATS: %v", err)
	}
	link.nc, link.js = nc, js
	return link, nil
}

// reconnects returns a channel closed when the connection next comes back.
func (l *natsLink) reconnects() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.reconnected
}

// Destruct closes the connection once no config uses it.
func (l *natsLink) Destruct() error {
	l.nc.Close()
	return nil
}

// connected reports whether the connection is up now.
func (l *natsLink) connected() bool { return l.nc.Status() == nats.CONNECTED }

// clusterHub is a hub's part of the cluster: the NATS objects its streams
// use, the node's liveness, and the cluster's view for the admin API.
type clusterHub struct {
	cfg    NATSConfig
	link   *natsLink
	logger *zap.Logger

	streamName, subjectPrefix string
	leaseBucket, interestName string

	mu       sync.Mutex
	ready    bool // the log and the buckets exist and answer
	epoch    string
	log      jetstream.Stream
	lease    jetstream.KeyValue
	leaseSt  jetstream.Stream // the lease bucket's own stream, for marker reads
	interest jetstream.KeyValue
	// warning is a setting that cannot work with this NATS, for the logs
	// and the admin view
	warning string

	maxEventSize int64 // against max_payload
	// answered is when JetStream last answered the probe (Unix ns), and
	// probeFailed whether the latest probe failed
	answered    atomic.Int64
	probeFailed atomic.Bool
}

func newClusterHub(cfg NATSConfig, link *natsLink, logger *zap.Logger, maxEventSize int64) *clusterHub {
	return &clusterHub{
		cfg: cfg, link: link, logger: logger,
		streamName:    "SSEFANOUT_" + cfg.Name,
		subjectPrefix: "ssefanout." + cfg.Name + ".s.",
		leaseBucket:   "SSEFANOUT_" + cfg.Name + "_lease",
		interestName:  "SSEFANOUT_" + cfg.Name + "_interest",
		maxEventSize:  maxEventSize,
	}
}

// run sets the NATS objects up (retrying while NATS is unreachable),
// checks twice a second that JetStream answers, and keeps this node's
// liveness key fresh, until ctx ends.
func (c *clusterHub) run(ctx context.Context, history int) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for i := 0; ; i++ {
		if !c.isReady() {
			if err := c.setup(ctx, history); err != nil && ctx.Err() == nil && c.link.connected() {
				c.logger.Warn("cannot set up the cluster's NATS objects; streams use their own upstreams meanwhile", zap.Error(err))
			}
		} else {
			c.probe(ctx)
			if i%2 == 0 {
				c.beat(ctx)
			}
		}
		select {
		case <-ctx.Done():
			c.mu.Lock()
			kv := c.interest
			c.mu.Unlock()
			if kv != nil && c.link.connected() {
				dctx, cancel := context.WithTimeout(context.Background(), time.Second)
				_ = kv.Delete(dctx, "node."+nodeID)
				cancel()
			}
			return
		case <-t.C:
		}
	}
}

// updateLimits gives an existing log the limits of this node's config
// (history, max_age, max_bytes, replicas), keeping the rest of its config
// and its epoch: a changed limit takes effect at the next start instead of
// being silently kept from the config that made the log.
func (c *clusterHub) updateLimits(ctx context.Context, log jetstream.Stream, want jetstream.StreamConfig) (jetstream.Stream, error) {
	have := log.CachedInfo().Config
	if have.MaxMsgsPerSubject == want.MaxMsgsPerSubject && have.MaxAge == want.MaxAge &&
		have.MaxBytes == want.MaxBytes && have.Replicas == want.Replicas {
		return log, nil
	}
	upd := have
	upd.MaxMsgsPerSubject, upd.MaxAge, upd.MaxBytes, upd.Replicas = want.MaxMsgsPerSubject, want.MaxAge, want.MaxBytes, want.Replicas
	if _, err := c.link.js.UpdateStream(ctx, upd); err != nil {
		return nil, fmt.Errorf("updating its limits: %w", err)
	}
	c.logger.Info("cluster: the log's limits changed to this config's",
		zap.Int64("history", want.MaxMsgsPerSubject), zap.Duration("max_age", want.MaxAge),
		zap.Int64("max_bytes", want.MaxBytes), zap.Int("replicas", want.Replicas))
	return c.link.js.Stream(ctx, c.streamName)
}

// setup creates (or finds) the log stream and the buckets.
func (c *clusterHub) setup(ctx context.Context, history int) error {
	if !c.link.connected() {
		return errors.New("not connected")
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	js := c.link.js
	cfg := jetstream.StreamConfig{
		Name:              c.streamName,
		Subjects:          []string{c.subjectPrefix + "*"},
		Storage:           jetstream.FileStorage,
		Replicas:          c.cfg.Replicas,
		Retention:         jetstream.LimitsPolicy,
		Discard:           jetstream.DiscardOld,
		MaxMsgsPerSubject: int64(max(history, 1)),
		MaxAge:            time.Duration(c.cfg.MaxAge),
		MaxBytes:          c.cfg.MaxBytes,
		Duplicates:        2 * time.Minute,
		Metadata:          map[string]string{"ssefanout_epoch": newEpoch(), "ssefanout_format": "1"},
	}
	if c.cfg.MaxBytes == 0 {
		cfg.MaxBytes = -1
	}
	// never overwrite an existing log's epoch: create, or read it back
	log, err := js.CreateStream(ctx, cfg)
	if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		log, err = js.Stream(ctx, c.streamName)
		if err == nil {
			log, err = c.updateLimits(ctx, log, cfg)
		}
	}
	if err != nil {
		return fmt.Errorf("log stream %s: %w", c.streamName, err)
	}
	epoch := log.CachedInfo().Config.Metadata["ssefanout_epoch"]
	lease, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: c.leaseBucket, History: 1, Replicas: c.cfg.Replicas, Storage: jetstream.FileStorage,
		LimitMarkerTTL: time.Minute,
	})
	if err != nil {
		return fmt.Errorf("lease bucket %s: %w", c.leaseBucket, err)
	}
	leaseSt, err := js.Stream(ctx, "KV_"+c.leaseBucket)
	if err != nil {
		return fmt.Errorf("lease bucket %s: %w", c.leaseBucket, err)
	}
	interest, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: c.interestName, History: 1, Replicas: c.cfg.Replicas, Storage: jetstream.FileStorage,
		LimitMarkerTTL: time.Minute,
	})
	if err != nil {
		return fmt.Errorf("interest bucket %s: %w", c.interestName, err)
	}
	warning := ""
	if need := c.maxEventSize + 2*maxFieldLen + maxLogOverhead; need > c.link.nc.MaxPayload() {
		warning = fmt.Sprintf("an event of max_event_size (%d bytes) with its id, type and framing takes up to %d bytes in a log message, over NATS's max_payload of %d: events that do not fit are skipped (counted in events_skipped_total); raise max_payload in the NATS servers' config to at least %d, or lower max_event_size", c.maxEventSize, need, c.link.nc.MaxPayload(), need)
		c.logger.Warn("cluster: " + warning)
	}
	c.mu.Lock()
	c.ready, c.epoch, c.log, c.lease, c.leaseSt, c.interest, c.warning = true, epoch, log, lease, leaseSt, interest, warning
	c.mu.Unlock()
	c.answered.Store(time.Now().UnixNano())
	c.logger.Info("cluster ready", zap.String("name", c.cfg.Name), zap.String("node", nodeID), zap.String("epoch", epoch))
	return nil
}

// beat refreshes this node's liveness key, by which holders count only
// the interest of live nodes.
func (c *clusterHub) beat(ctx context.Context) {
	c.mu.Lock()
	kv := c.interest
	c.mu.Unlock()
	if kv == nil || !c.link.connected() {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, _ = c.link.js.PublishMsg(ctx, &nats.Msg{Subject: "$KV." + c.interestName + ".node." + nodeID, Data: []byte(nodeID)},
		jetstream.WithMsgTTL(3*time.Second))
}

// probe asks the log stream's leader for its state: a connection to some
// NATS server is not enough, JetStream must answer (it does not while it
// elects leaders, after a server's crash or a restart).
func (c *clusterHub) probe(ctx context.Context) {
	log, _, _, _ := c.objects()
	if log == nil || !c.link.connected() {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	_, err := log.Info(ctx)
	if err == nil {
		c.answered.Store(time.Now().UnixNano())
	}
	c.probeFailed.Store(err != nil)
}

// isReady reports whether the NATS objects are set up.
func (c *clusterHub) isReady() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ready
}

// objects returns the NATS objects and the log's epoch.
func (c *clusterHub) objects() (log jetstream.Stream, lease, interest jetstream.KeyValue, epoch string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.log, c.lease, c.interest, c.epoch
}

// leaseLog returns the lease bucket's stream, nil before the set-up.
func (c *clusterHub) leaseLog() jetstream.Stream {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leaseSt
}

// healthy reports whether NATS is reachable, the objects set up, and
// JetStream answers: its last probe did not fail, or it answered within
// the last second and a half. (A process that was paused has an old
// answer but no failed probe: it is not taken for an outage.)
func (c *clusterHub) healthy() bool {
	return c.link.connected() && c.isReady() &&
		(!c.probeFailed.Load() || time.Since(time.Unix(0, c.answered.Load())) < 1500*time.Millisecond)
}

// digest is the collision-resistant name of a stream in NATS: 128 bits of
// SHA-256 of its key, never the URL or vary values.
func digest(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:16])
}

// newEpoch is a random 64-bit epoch, in hex.
func newEpoch() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
