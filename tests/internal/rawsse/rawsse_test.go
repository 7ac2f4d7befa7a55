package rawsse

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// connect makes n clients of c's listener and waits until they are joined.
func connect(t *testing.T, c *Clients, ln net.Listener, n int, header string) []net.Conn {
	t.Helper()
	var conns []net.Conn
	for range n {
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		fmt.Fprintf(conn, "GET /x HTTP/1.1\r\nHost: x\r\n%s\r\n", header)
		conns = append(conns, conn)
	}
	for deadline := time.Now().Add(5 * time.Second); c.Open() < int64(n); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d clients joined", c.Open(), n)
		}
	}
	c.Join(nil)
	return conns
}

func listen(t *testing.T, c *Clients) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go c.Serve(ln)
	return ln
}

func TestASlowClientGetsEverythingInOrder(t *testing.T) {
	var c Clients
	defer c.Close()
	ln := listen(t, &c)
	conn := connect(t, &c, ln, 1, "")[0]
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("head: %v %v", resp, err)
	}
	// far more than the socket buffers hold, written before any is read
	var want bytes.Buffer
	for i := range 300 {
		event := fmt.Sprintf("id: %d\ndata: %s\n\n", i, strings.Repeat("x", 8000))
		want.WriteString(event)
		c.Write(Frame(nil, []byte(event)))
	}
	if c.Dropped() != 0 {
		t.Fatalf("dropped a client with %d bytes unread", want.Len())
	}
	got := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, int64(want.Len())))
		got <- b
	}()
	for {
		select {
		case b := <-got:
			if !bytes.Equal(b, want.Bytes()) {
				t.Fatalf("got %d bytes, not the %d written, in order", len(b), want.Len())
			}
			return
		case <-time.After(time.Millisecond):
			c.Write(nil) // what is pending
		}
	}
}

func TestAClientThatNeverReadsIsDropped(t *testing.T) {
	var c Clients
	defer c.Close()
	ln := listen(t, &c)
	connect(t, &c, ln, 2, "")
	chunk := Frame(nil, bytes.Repeat([]byte("y"), 64<<10))
	for i := 0; c.Dropped() < 2 && i < 4*MaxPending/len(chunk)+100; i++ {
		c.Write(chunk)
	}
	if c.Dropped() != 2 || c.Open() != 0 {
		t.Errorf("dropped %d, open %d, want both dropped past %d bytes pending", c.Dropped(), c.Open(), MaxPending)
	}
}

func TestJoinGivesTheBacklogFirst(t *testing.T) {
	var c Clients
	defer c.Close()
	ln := listen(t, &c)
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 41\r\n\r\n")
	for c.Open() == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	var asked string
	c.Join(func(id string) []byte {
		asked = id
		return Frame(nil, []byte("id: 42\ndata: old\n\n"))
	})
	c.Write(Frame(nil, []byte("id: 43\ndata: new\n\n")))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, len("id: 42\ndata: old\n\nid: 43\ndata: new\n\n"))
	if _, err := io.ReadFull(resp.Body, b); err != nil || asked != "41" || string(b) != "id: 42\ndata: old\n\nid: 43\ndata: new\n\n" {
		t.Errorf("Last-Event-ID %q; got %q, %v", asked, b, err)
	}
}

func TestOnlyGET(t *testing.T) {
	var c Clients
	ln := listen(t, &c)
	resp, err := http.Post("http://"+ln.Addr().String(), "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed || c.Open() != 0 {
		t.Errorf("POST: %s, %d clients", resp.Status, c.Open())
	}
}

func TestFrame(t *testing.T) {
	for _, n := range []int{1, 15, 16, 255, 4096} {
		data := strings.Repeat("x", n)
		chunk := string(Frame([]byte("before"), []byte(data)))
		size, rest, ok := strings.Cut(strings.TrimPrefix(chunk, "before"), "\r\n")
		if !ok || size != fmt.Sprintf("%x", n) || rest != data+"\r\n" {
			t.Errorf("frame of %d bytes: %q", n, chunk)
		}
	}
	if got := Frame([]byte("a"), nil); string(got) != "a" {
		t.Errorf("empty data framed as %q: an empty chunk ends the body", got)
	}
}
