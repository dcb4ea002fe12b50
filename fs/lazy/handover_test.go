package lazy

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/fusefd"
)

// handoverBound is how long a request on a handed-over connection may take
// before the test fails: the next daemon answers at once, or not at all.
const handoverBound = 30 * time.Second

// within runs f and fails the test now if it does not return within
// handoverBound: f's FUSE requests at mnt wait for a daemon that does not
// answer them. Then it aborts the mount's FUSE connection (a forced
// unmount), so that f's requests fail and the test can clean up.
func within(t *testing.T, mnt, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
		return
	case <-time.After(handoverBound):
	}
	t.Errorf("%s did not return within %v: nobody answers the FUSE connection", what, handoverBound)
	if err := unix.Unmount(mnt, unix.MNT_FORCE); err != nil {
		t.Logf("forced unmount of %s: %v", mnt, err)
	}
	<-done
	t.FailNow()
}

// TestHandoverChild is the daemon TestHandover kills: run alone it does
// nothing.
func TestHandoverChild(t *testing.T) {
	sock, mnt := os.Getenv("LAZY_HANDOVER_SOCK"), os.Getenv("LAZY_HANDOVER_MNT")
	if sock == "" {
		t.Skip("run by TestHandover")
	}
	c, err := fusefd.Connect(sock)
	if err != nil {
		t.Fatal(err)
	}
	data, desc, _ := buildLayer(t)
	l := openLayer(t, data, &testBlob{data: data}, desc, Options{Handover: c})
	if err := l.Mount(context.Background(), mnt); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("ready\n")
	select {} // until killed
}

// TestHandover: a daemon serving a layer is killed (SIGKILL) while a file
// is open and half read; a new daemon takes the FUSE connection back from
// the holder and serves it: the open file reads on (its node id and
// handle are the dead daemon's), a file never looked up opens and reads,
// and the mount lists as before. Without the handover the reads fail with
// ENOTCONN.
func TestHandover(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting FUSE needs root")
	}
	dir := t.TempDir()
	sock, mnt := filepath.Join(dir, "h.sock"), filepath.Join(dir, "lazy")
	os.Mkdir(mnt, 0o755)
	holderDone := make(chan error, 1)
	go func() { holderDone <- fusefd.RunHolder(sock) }()

	child := exec.Command(os.Args[0], "-test.run=^TestHandoverChild$")
	// The child is killed, so its own t.TempDir cleanups never run: its
	// temporary directories go under this test's, which removes them.
	child.Env = append(os.Environ(), "LAZY_HANDOVER_SOCK="+sock, "LAZY_HANDOVER_MNT="+mnt, "TMPDIR="+dir)
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	child.Stderr = os.Stderr
	// The holder goroutine binds its socket before the child connects:
	// wait for the socket.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("holder socket missing")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			child.Process.Kill()
			child.Wait()
		}
	})
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "ready") {
				ready <- true
				break
			}
		}
		close(ready)
	}()
	if ok := <-ready; !ok {
		t.Fatal("the first daemon did not mount")
	}

	_, _, files := buildLayer(t)
	big := files["data/big"]
	f, err := os.Open(filepath.Join(mnt, "data/big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	first := make([]byte, 1<<20)
	if _, err := f.ReadAt(first, 0); err != nil || !bytes.Equal(first, big[:1<<20]) {
		t.Fatalf("read before the kill: %v", err)
	}

	child.Process.Kill()
	child.Wait()
	killed = true

	c, err := fusefd.Connect(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	data, desc, _ := buildLayer(t)
	l := openLayer(t, data, &testBlob{data: data}, desc, Options{Handover: c})
	if err := l.Mount(context.Background(), mnt); err != nil {
		t.Fatal(err)
	}
	if !l.Resumed() {
		t.Error("the new daemon mounted afresh instead of serving the kept connection")
	}
	defer func() {
		f.Close() // an open file keeps the detached mount alive
		done, err := l.Unmount()
		if err != nil {
			t.Errorf("unmount: %v", err)
			return
		}
		select {
		case <-done:
		case <-time.After(handoverBound):
			t.Errorf("the server did not stop within %v of the unmount", handoverBound)
		}
		l.Close()
		c.Close()
		select {
		case <-holderDone:
		case <-time.After(10 * time.Second):
			t.Error("the holder runs on after the mount ended")
		}
	}()

	within(t, mnt, "a read of the file open across the kill", func() {
		rest := make([]byte, len(big)-(2<<20))
		if n, err := f.ReadAt(rest, 2<<20); n != len(rest) || !bytes.Equal(rest, big[2<<20:]) {
			t.Errorf("the file open across the kill reads %d bytes (%v), or other bytes", n, err)
		}
	})
	within(t, mnt, "a read of a file first opened after the kill", func() {
		got, err := os.ReadFile(filepath.Join(mnt, "data/small"))
		if err != nil || !bytes.Equal(got, files["data/small"]) {
			t.Errorf("a file first opened after the kill: %v", err)
		}
	})
	within(t, mnt, "a listing after the kill", func() {
		ents, err := os.ReadDir(filepath.Join(mnt, "etc"))
		if err != nil || len(ents) != 4 {
			t.Errorf("etc after the kill: %d entries, %v", len(ents), err)
		}
	})
	within(t, mnt, "a stat after the kill", func() {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(mnt, "etc/hostname"), &st); err != nil || st.Uid != 1000 {
			t.Errorf("stat after the kill: uid %d, %v", st.Uid, err)
		}
	})
}

// TestCrashSuccessorHandles: a daemon that takes a connection over after
// a crash (no record of the open files) hands out file handles that none
// of the crashed daemon's opens had: the kernel still holds those, and a
// read through one must reach its own file.
func TestCrashSuccessorHandles(t *testing.T) {
	l, _, _ := dirsLayer(t, Options{})
	crashed := newRawFS(l, nil)
	held := map[uint64]bool{}
	for range 1000 {
		held[crashed.addHandle(&handle{r: crashed, num: 1})] = true
	}
	next := newRawFS(l, nil)
	if err := next.restore(nil); err != nil { // a crash: nothing recorded
		t.Fatal(err)
	}
	for range 1000 {
		if fh := next.addHandle(&handle{r: next, num: 2}); held[fh] {
			t.Fatalf("the daemon after a crash handed out handle %d, which the crashed daemon had handed out", fh)
		}
	}
}
