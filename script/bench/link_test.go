package main

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// echoServer answers each line with the same line until the client
// half-closes, then closes.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func TestLinkDelaysAndCounts(t *testing.T) {
	l, err := newLink("127.0.0.1:0", echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	const rtt = 40 * time.Millisecond
	l.setRTT(rtt)

	c, err := net.Dial("tcp", l.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	roundTrip := func(msg string) time.Duration {
		t.Helper()
		start := time.Now()
		if _, err := io.WriteString(c, msg+"\n"); err != nil {
			t.Fatal(err)
		}
		got, err := r.ReadString('\n')
		if err != nil || strings.TrimSpace(got) != msg {
			t.Fatalf("echo of %q: %q, %v", msg, got, err)
		}
		return time.Since(start)
	}
	// The first exchange pays for the handshake too: two round trips.
	if d := roundTrip("first"); d < 2*rtt || d > 2*rtt+150*time.Millisecond {
		t.Errorf("first exchange took %v, want about %v", d, 2*rtt)
	}
	if d := roundTrip("second"); d < rtt || d > rtt+150*time.Millisecond {
		t.Errorf("second exchange took %v, want about %v", d, rtt)
	}
	c.(*net.TCPConn).CloseWrite()
	if _, err := io.ReadAll(r); err != nil {
		t.Fatalf("half-close not passed on: %v", err)
	}
	got := l.counters()
	want := int64(len("first\n") + len("second\n"))
	if got.Down != want || got.Up != want || got.Conns != 1 {
		t.Errorf("counters = %+v, want %d bytes each way over 1 connection", got, want)
	}
}
