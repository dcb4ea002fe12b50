package fusefd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// notifySocket is the test's service manager: a datagram socket bound
// where NOTIFY_SOCKET points, that reads sd_notify messages with their
// descriptors and the sender's credentials.
type notifySocket struct {
	path string
	fd   int
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PASSCRED, 1); err != nil {
		t.Fatal(err)
	}
	return &notifySocket{path: path, fd: fd}
}

// notification is one sd_notify message as the service manager sees it.
type notification struct {
	vars map[string]string
	fds  []int
	pid  int32
}

// next returns the next message sent, or false if none is waiting (every
// Store method sends before it returns).
func (n *notifySocket) next(t *testing.T) (notification, bool) {
	t.Helper()
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4)+unix.CmsgSpace(unix.SizeofUcred))
	k, oobn, _, _, err := unix.Recvmsg(n.fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if errors.Is(err, unix.EAGAIN) {
		return notification{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	m := notification{vars: map[string]string{}}
	for _, l := range strings.Split(string(buf[:k]), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m.vars[k] = v
		}
	}
	scms, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	for _, scm := range scms {
		if fds, err := unix.ParseUnixRights(&scm); err == nil {
			m.fds = append(m.fds, fds...)
		} else if cred, err := unix.ParseUnixCredentials(&scm); err == nil {
			m.pid = cred.Pid
		}
	}
	t.Cleanup(func() {
		for _, fd := range m.fds {
			unix.Close(fd)
		}
	})
	return m, true
}

// sameFile reports whether descriptors a and b are the same open file.
func sameFile(t *testing.T, a, b int) bool {
	t.Helper()
	// Pipes have an inode each: equal inodes are the same pipe end here.
	var sa, sb unix.Stat_t
	if err := unix.Fstat(a, &sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fstat(b, &sb); err != nil {
		t.Fatal(err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// TestStore: a kept connection goes to the service manager with FDSTORE=1
// under its name, and comes back, with its INIT, note and state, to the
// next daemon that gets it in LISTEN_FDS; a descriptor of the Store's
// naming without a record is removed from the store; a dropped connection
// is removed from the store (FDSTOREREMOVE=1) and forgotten.
func TestStore(t *testing.T) {
	ns := newNotifySocket(t)
	dir := filepath.Join(t.TempDir(), "fdstore")
	s1, err := OpenStore(ns.path, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := keepPipe(t, s1)
	if err := s1.SetState("/mp", []byte("state")); err != nil {
		t.Fatal(err)
	}
	m, ok := ns.next(t)
	if !ok || m.vars["FDSTORE"] != "1" || m.vars["FDNAME"] != StoreName("/mp") || len(m.fds) != 1 {
		t.Fatalf("Keep sent %+v (sent: %v), want FDSTORE=1, FDNAME=%s and one descriptor", m, ok, StoreName("/mp"))
	}
	if !sameFile(t, m.fds[0], p[0]) {
		t.Fatal("the stored descriptor is not the connection's")
	}
	if m.pid != int32(os.Getpid()) {
		t.Errorf("sent by pid %d, want the daemon's own (%d): NotifyAccess=main accepts only that", m.pid, os.Getpid())
	}
	if _, ok := ns.next(t); ok {
		t.Fatal("SetState sent a message: state belongs in the record")
	}
	s1.Close()
	unix.Close(p[0]) // the daemon is gone: only the store's copy is left

	// The next daemon, as the service manager starts it.
	stray, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	other, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	passed := m.fds[0]
	s2, err := OpenStore(ns.path, dir, []NamedFd{{passed, StoreName("/mp")}, {stray, StoreNamePrefix + "0000"}, {other, "other"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	m, ok = ns.next(t)
	if !ok || m.vars["FDSTOREREMOVE"] != "1" || m.vars["FDNAME"] != StoreNamePrefix+"0000" {
		t.Fatalf("a stored descriptor without a record: sent %+v (sent: %v), want FDSTOREREMOVE=1 with its name", m, ok)
	}
	if _, err := unix.FcntlInt(uintptr(stray), unix.F_GETFD, 0); err == nil {
		t.Error("the descriptor without a record is still open")
	}
	if _, err := unix.FcntlInt(uintptr(other), unix.F_GETFD, 0); err != nil {
		t.Error("a descriptor of another name was closed")
	}
	if !s2.Holds("/mp") || len(s2.Unclaimed()) != 1 {
		t.Fatalf("Holds(/mp) = %v, Unclaimed = %v", s2.Holds("/mp"), s2.Unclaimed())
	}
	h, ok := s2.Take("/mp")
	if !ok || h.Conn.Fd != passed || string(h.Conn.Init) != "init" || string(h.Note) != "note" || string(h.State) != "state" {
		t.Fatalf("Take = %+v (%v), want fd %d with init, note and state", h, ok, passed)
	}
	if _, ok := s2.Take("/mp"); ok {
		t.Fatal("taken twice")
	}
	if err := s2.Keep("/mp", &h.Conn, []byte("note")); err != nil {
		t.Fatal(err)
	}
	if m, ok := ns.next(t); ok {
		t.Fatalf("keeping a connection taken from the store sent %+v: it is there already", m)
	}
	if err := s2.Drop("/mp"); err != nil {
		t.Fatal(err)
	}
	m, ok = ns.next(t)
	if !ok || m.vars["FDSTOREREMOVE"] != "1" || m.vars["FDNAME"] != StoreName("/mp") {
		t.Fatalf("Drop sent %+v (sent: %v), want FDSTOREREMOVE=1 with FDNAME=%s", m, ok, StoreName("/mp"))
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("records left after Drop: %v", ents)
	}
}

// TestStoreName: names are valid systemd descriptor names and differ per
// mountpoint.
func TestStoreName(t *testing.T) {
	a, b := StoreName("/var/lib/lazylayer/snapshots/1/fs"), StoreName("/var/lib/lazylayer/snapshots/2/fs")
	if a == b {
		t.Fatal("two mountpoints share a name")
	}
	for _, n := range []string{a, b} {
		if len(n) > 255 || strings.ContainsAny(n, ":\n= ") || !strings.HasPrefix(n, StoreNamePrefix) {
			t.Errorf("StoreName gave %q", n)
		}
	}
}

// TestListenFds runs itself with two descriptors passed as systemd passes
// them and checks that ListenFds returns them by name.
func TestListenFds(t *testing.T) {
	if os.Getenv("FUSEFD_LISTEN_CHILD") == "1" {
		fds, err := ListenFds()
		fmt.Printf("err=%v\n", err)
		for _, f := range fds {
			flags, _ := unix.FcntlInt(uintptr(f.Fd), unix.F_GETFD, 0)
			fmt.Printf("%d %s cloexec=%v\n", f.Fd, f.Name, flags&unix.FD_CLOEXEC != 0)
		}
		fmt.Printf("env=%q\n", os.Getenv("LISTEN_FDS")+os.Getenv("LISTEN_PID")+os.Getenv("LISTEN_FDNAMES"))
		return
	}
	r1, w1, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Close()
	defer w1.Close()
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, os.Args[0], "-test.run=^TestListenFds$")
	cmd.Env = append(os.Environ(), "FUSEFD_LISTEN_CHILD=1", "LISTEN_FDS=2", "LISTEN_FDNAMES=first:second")
	cmd.ExtraFiles = []*os.File{r1, w1}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{"err=<nil>", "3 first cloexec=true", "4 second cloexec=true", `env=""`} {
		if !bytes.Contains(out, []byte(want+"\n")) {
			t.Errorf("child output lacks %q:\n%s", want, out)
		}
	}
}

// TestStoreAdopt: connections a Holder keeps move into the store, held for
// Take with what the Holder kept, and the Holder lets them go.
func TestStoreAdopt(t *testing.T) {
	ns := newNotifySocket(t)
	sock := filepath.Join(t.TempDir(), "h.sock")
	exited := make(chan error, 1)
	go func() { exited <- RunHolder(sock) }()
	c1, err := waitHolder(t, sock)
	if err != nil {
		t.Fatal(err)
	}
	p := keepPipe(t, c1)
	if err := c1.SetState("/mp", []byte("state")); err != nil {
		t.Fatal(err)
	}
	c1.Close()

	c2, err := Connect(sock)
	if err != nil {
		t.Fatal(err)
	}
	s, err := OpenStore(ns.path, filepath.Join(t.TempDir(), "fdstore"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Adopt(c2); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	m, ok := ns.next(t)
	if !ok || m.vars["FDSTORE"] != "1" || m.vars["FDNAME"] != StoreName("/mp") || len(m.fds) != 1 || !sameFile(t, m.fds[0], p[0]) {
		t.Fatalf("Adopt sent %+v (sent: %v), want the connection with FDSTORE=1 and its name", m, ok)
	}
	h, ok := s.Take("/mp")
	if !ok || string(h.Conn.Init) != "init" || string(h.Note) != "note" || string(h.State) != "state" {
		t.Fatalf("Take after Adopt = %+v, %v", h, ok)
	}
	h.Conn.Close()
	unix.Close(p[0])
	// The Holder, holding nothing and with no client, exits.
	if err := <-exited; err != nil {
		t.Fatal(err)
	}
}

// waitHolder connects to the Holder a goroutine of the test starts at sock.
func waitHolder(t *testing.T, sock string) (*Client, error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := Connect(sock)
		if err == nil || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(10 * time.Millisecond) // the holder goroutine binds its socket
	}
}
