package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// link is a TCP proxy standing for the network between the clients
// (containerd, lazylayer) and the registry. It delays the data in each
// direction by half the round-trip time, charges one more round trip
// before a new connection's first request goes on (the TCP handshake),
// and counts the bytes it delivers each way. Bandwidth is not its job: tc
// shapes what it sends from its port.
//
// Delaying in a proxy is not a real long path: the clients' TCP sees a
// short round trip, so slow start and window limits of a real 20 ms path
// are not modelled; request latency and connection setup are.
type link struct {
	ln       net.Listener
	upstream string
	oneWay   atomic.Int64 // delay per direction, nanoseconds
	down     atomic.Int64 // bytes delivered to clients
	up       atomic.Int64 // bytes delivered upstream
	conns    atomic.Int64 // connections accepted

	wg     sync.WaitGroup
	mu     sync.Mutex
	open   map[net.Conn]struct{} // guarded by mu: both ends of every pair
	closed bool                  // guarded by mu
}

// chunkSize is the most a pipe reads at once; pipeDepth the chunks it
// holds, so a direction buffers at most 2 MiB (well above 100 Mbit/s
// times 10 ms).
const (
	chunkSize = 32 << 10
	pipeDepth = 64
)

var chunkPool = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

// newLink listens on addr and forwards each connection to upstream.
func newLink(addr, upstream string) (*link, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("link listen on %s: %w", addr, err)
	}
	l := &link{ln: ln, upstream: upstream, open: map[net.Conn]struct{}{}}
	l.wg.Add(1)
	go l.serve()
	return l, nil
}

// addr returns the host:port clients connect to.
func (l *link) addr() string { return l.ln.Addr().String() }

// port returns the port clients connect to.
func (l *link) port() int { return l.ln.Addr().(*net.TCPAddr).Port }

// setRTT sets the round-trip time new data is delayed by.
func (l *link) setRTT(rtt time.Duration) { l.oneWay.Store(int64(rtt / 2)) }

// linkCounters are the link's totals since it started.
type linkCounters struct {
	Down, Up int64 // bytes delivered to clients, upstream
	Conns    int64 // connections accepted
}

func (l *link) counters() linkCounters {
	return linkCounters{Down: l.down.Load(), Up: l.up.Load(), Conns: l.conns.Load()}
}

// sub returns c - o.
func (c linkCounters) sub(o linkCounters) linkCounters {
	return linkCounters{Down: c.Down - o.Down, Up: c.Up - o.Up, Conns: c.Conns - o.Conns}
}

func (l *link) serve() {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return // closed
		}
		l.conns.Add(1)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.handle(c)
		}()
	}
}

// track records c as open, or closes it and reports false once the link
// is closed.
func (l *link) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		c.Close()
		return false
	}
	l.open[c] = struct{}{}
	return true
}

func (l *link) untrack(c net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.open, c)
	c.Close()
}

func (l *link) handle(client net.Conn) {
	if !l.track(client) {
		return
	}
	defer l.untrack(client)
	server, err := net.DialTimeout("tcp", l.upstream, 10*time.Second)
	if err != nil {
		return // the client sees its connection closed
	}
	if !l.track(server) {
		return
	}
	defer l.untrack(server)
	delay := time.Duration(l.oneWay.Load())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		pipe(server, client, delay, 2*delay, &l.up)
	}()
	go func() {
		defer wg.Done()
		pipe(client, server, delay, 0, &l.down)
	}()
	wg.Wait()
}

type chunk struct {
	buf *[]byte
	n   int
	due time.Time
}

// pipe copies src to dst, each chunk delay after it was read (the first
// one setup later still), adding the bytes written to count. At src's end
// it half-closes dst; on an error it closes both, which ends the opposite
// pipe too.
func pipe(dst, src net.Conn, delay, setup time.Duration, count *atomic.Int64) {
	chunks := make(chan chunk, pipeDepth)
	var readErr error
	go func() {
		defer close(chunks)
		extra := setup
		for {
			buf := chunkPool.Get().(*[]byte)
			n, err := src.Read(*buf)
			if n > 0 {
				chunks <- chunk{buf: buf, n: n, due: time.Now().Add(delay + extra)}
				extra = 0
			} else {
				chunkPool.Put(buf)
			}
			if err != nil {
				readErr = err
				return
			}
		}
	}()
	failed := false
	for c := range chunks {
		if !failed {
			if d := time.Until(c.due); d > 0 {
				time.Sleep(d)
			}
			n, err := dst.Write((*c.buf)[:c.n])
			count.Add(int64(n))
			if err != nil {
				failed = true
				dst.Close()
				src.Close() // unblocks the reader
			}
		}
		chunkPool.Put(c.buf)
	}
	if failed {
		return
	}
	if errors.Is(readErr, io.EOF) {
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
			return
		}
	}
	dst.Close()
	src.Close()
}

// close stops accepting, closes every connection and waits for the
// goroutines.
func (l *link) close() error {
	l.mu.Lock()
	l.closed = true
	for c := range l.open {
		c.Close()
	}
	l.mu.Unlock()
	err := l.ln.Close()
	l.wg.Wait()
	return err
}
