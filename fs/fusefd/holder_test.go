package fusefd

import (
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestHolder: a connection kept by one client is taken back, the same open
// file with its INIT and note, by the next; an ended connection is closed
// by the holder; the holder returns once it holds nothing and nobody is
// connected.
func TestHolder(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "h.sock")
	exited := make(chan error, 1)
	go func() { exited <- RunHolder(sock) }()
	noStart := exec.Command("/bin/false") // the holder runs: never started
	var c1 *Client
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if c1, err = StartHolder(sock, noStart); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // the holder goroutine binds its socket
	}
	p := keepPipe(t, c1)
	unix.Close(p[0])
	// A /dev/fuse descriptor never mounted is an ended connection.
	dead, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no /dev/fuse: %v", err)
	}
	if err := c1.Keep("/dead", &Conn{Fd: dead, Init: []byte("x")}, nil); err != nil {
		t.Fatal(err)
	}
	unix.Close(dead)
	c1.Close()

	var c2 *Client
	deadline = time.Now().Add(10 * time.Second)
	for {
		if c2, err = StartHolder(sock, noStart); err != nil {
			t.Fatal(err)
		}
		if !c2.Holds("/dead") {
			break
		}
		c2.Close()
		if time.Now().After(deadline) {
			t.Fatal("the holder still holds an ended connection after 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	h, ok := c2.Take("/mp")
	if !ok {
		t.Fatal("the kept connection is not listed")
	}
	if string(h.Conn.Init) != "init" || string(h.Note) != "note" {
		t.Errorf("kept init %q note %q", h.Conn.Init, h.Note)
	}
	if _, err := unix.Write(p[1], []byte("same file")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 32)
	n, err := unix.Read(h.Conn.Fd, buf)
	if err != nil || string(buf[:n]) != "same file" {
		t.Errorf("read from the descriptor taken back: %q, %v", buf[:n], err)
	}
	h.Conn.Close()
	if err := c2.Drop("/mp"); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("holder: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("the holder runs on with nothing held and no client")
	}
}

// keepPipe gives k a pipe's read end as the connection of "/mp", with INIT
// "init" and note "note", and returns the pipe; its write end is closed
// when the test ends.
func keepPipe(t *testing.T, k interface {
	Keep(mountpoint string, conn *Conn, note []byte) error
}) [2]int {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[1]) })
	if err := k.Keep("/mp", &Conn{Fd: p[0], Init: []byte("init")}, []byte("note")); err != nil {
		t.Fatal(err)
	}
	return p
}
