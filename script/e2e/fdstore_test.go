package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/lazylayer/lazylayer/fs/fusefd"
	"github.com/lazylayer/lazylayer/fs/layer/layerstatus"
	"github.com/lazylayer/lazylayer/script/internal/testimage"
)

// fdStoreManager plays systemd's part for a daemon run with a file
// descriptor store (FileDescriptorStoreMax=, NotifyAccess=main): it owns
// the NOTIFY_SOCKET, keeps the descriptors the daemon stores (FDSTORE=1
// with FDNAME=), removes them on FDSTOREREMOVE=1, closes one the kernel
// reports POLLHUP or POLLERR on unless it was stored with FDPOLL=0, and
// passes the store to the next daemon in LISTEN_FDS.
type fdStoreManager struct {
	t    *testing.T
	path string
	sock int

	mu      sync.Mutex
	stored  []storedFd   // guarded by mu
	mains   map[int]bool // every daemon started; guarded by mu
	refused []string     // store messages from another process; guarded by mu
	dropped []string     // closed on POLLHUP or POLLERR; guarded by mu
}

type storedFd struct {
	name   string
	f      *os.File
	noPoll bool // FDPOLL=0
}

// newFDStoreManager sets NOTIFY_SOCKET and FDSTORE (as systemd 254 and
// later do) for the processes the test starts from now on.
func newFDStoreManager(t *testing.T) *fdStoreManager {
	t.Helper()
	dir, err := os.MkdirTemp("", "lazylayer-e2e-notify-")
	if err != nil {
		t.Fatal(err)
	}
	m := &fdStoreManager{t: t, path: filepath.Join(dir, "notify.sock"), mains: map[int]bool{}}
	if m.sock, err = unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(m.sock, &unix.SockaddrUnix{Name: m.path}); err != nil {
		t.Fatal(err)
	}
	unix.SetsockoptInt(m.sock, unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		m.serve(done)
	}()
	t.Cleanup(func() {
		close(done)
		<-stopped
		unix.Close(m.sock)
		m.release()
		os.RemoveAll(dir)
	})
	t.Setenv("NOTIFY_SOCKET", m.path)
	t.Setenv("FDSTORE", "4096")
	return m
}

// serve reads notifications and watches the stored descriptors, as
// systemd's event loop does, until done is closed.
func (m *fdStoreManager) serve(done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		default:
		}
		m.mu.Lock()
		pfds := []unix.PollFd{{Fd: int32(m.sock), Events: unix.POLLIN}}
		for _, s := range m.stored {
			pfds = append(pfds, unix.PollFd{Fd: int32(s.f.Fd())}) // POLLHUP and POLLERR only
		}
		stored := append([]storedFd(nil), m.stored...)
		m.mu.Unlock()
		if _, err := unix.Poll(pfds, 100); err != nil && !errors.Is(err, unix.EINTR) {
			m.t.Errorf("notify socket: poll: %v", err)
			return
		}
		for i, s := range stored {
			if pfds[i+1].Revents&(unix.POLLHUP|unix.POLLERR) != 0 && !s.noPoll {
				m.remove(func(o storedFd) bool { return o.f == s.f }, fmt.Sprintf("%s (revents %#x)", s.name, pfds[i+1].Revents))
			}
		}
		for m.receive() {
		}
	}
}

// receive handles one notification; false if none is waiting.
func (m *fdStoreManager) receive() bool {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(64*4)+unix.CmsgSpace(unix.SizeofUcred))
	n, oobn, _, _, err := unix.Recvmsg(m.sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return false
	}
	vars := map[string]string{}
	for _, l := range strings.Split(string(buf[:n]), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			vars[k] = v
		}
	}
	var fds []int
	pid := 0
	if scms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, scm := range scms {
			if rights, err := unix.ParseUnixRights(&scm); err == nil {
				fds = append(fds, rights...)
			} else if cred, err := unix.ParseUnixCredentials(&scm); err == nil {
				pid = int(cred.Pid)
			}
		}
	}
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	if vars["FDSTORE"] != "1" && vars["FDSTOREREMOVE"] != "1" {
		closeAll() // READY=1 and the like, from containerd too
		return true
	}
	m.mu.Lock()
	main := m.mains[pid]
	if !main {
		m.refused = append(m.refused, fmt.Sprintf("pid %d: %q", pid, buf[:n]))
	}
	m.mu.Unlock()
	if !main {
		closeAll()
		return true
	}
	name := vars["FDNAME"]
	if vars["FDSTOREREMOVE"] == "1" {
		closeAll()
		m.remove(func(s storedFd) bool { return s.name == name }, "")
		return true
	}
	if name == "" {
		name = "stored"
	}
	m.mu.Lock()
	for _, fd := range fds {
		m.stored = append(m.stored, storedFd{name: name, f: os.NewFile(uintptr(fd), name), noPoll: vars["FDPOLL"] == "0"})
	}
	m.mu.Unlock()
	return true
}

// remove closes and forgets the stored descriptors that match; why, if
// not empty, records that the kernel ended them.
func (m *fdStoreManager) remove(match func(storedFd) bool, why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	kept := m.stored[:0]
	for _, s := range m.stored {
		if match(s) {
			s.f.Close()
			if why != "" {
				m.dropped = append(m.dropped, why)
			}
			continue
		}
		kept = append(kept, s)
	}
	m.stored = kept
}

// release empties the store, as systemd does when the unit stops.
func (m *fdStoreManager) release() {
	m.remove(func(storedFd) bool { return true }, "")
}

// releaseOnCleanup empties the store when the test ends, before the env
// stops its containers: their FUSE connections end then, as they do when
// the holder is killed (killHolderOnCleanup).
func (m *fdStoreManager) releaseOnCleanup() { m.t.Cleanup(m.release) }

// setMain makes pid a daemon allowed to use the store.
func (m *fdStoreManager) setMain(pid int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mains[pid] = true
}

// missing returns the mountpoints among mps whose FUSE connection is not
// in the store under the daemon's name for it.
func (m *fdStoreManager) missing(mps []string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, mp := range mps {
		found := false
		for _, s := range m.stored {
			if s.name == fusefd.StoreName(mp) {
				target, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", s.f.Fd()))
				found = found || target == "/dev/fuse"
			}
		}
		if !found {
			out = append(out, mp)
		}
	}
	return out
}

// listen returns the store as systemd passes it: the files from fd 3 on,
// and LISTEN_FDNAMES.
func (m *fdStoreManager) listen() ([]*os.File, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var files []*os.File
	var names []string
	for _, s := range m.stored {
		files = append(files, s.f)
		names = append(names, s.name)
	}
	return files, strings.Join(names, ":")
}

// check fails the test for store messages from processes that are not the
// daemon, and for stored descriptors the kernel ended.
func (m *fdStoreManager) check(what string) {
	m.t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.refused) > 0 {
		m.t.Errorf("%s: store messages not from the daemon's main process: %v", what, m.refused)
	}
	if len(m.dropped) > 0 {
		m.t.Errorf("%s: systemd would have closed stored FUSE connections (POLLHUP or POLLERR): %v", what, m.dropped)
	}
	m.refused, m.dropped = nil, nil
}

// startLazylayerFromStore starts the daemon as systemd does when the
// daemon's store holds descriptors: LISTEN_FDS, LISTEN_FDNAMES, and
// LISTEN_PID set to the daemon's own pid.
func (e *env) startLazylayerFromStore(m *fdStoreManager) {
	e.t.Helper()
	files, names := m.listen()
	e.lazy = startProcWith(e.t, e.lazyLog, func(c *exec.Cmd) {
		c.ExtraFiles = files
		c.Env = append(c.Env, fmt.Sprintf("LISTEN_FDS=%d", len(files)), "LISTEN_FDNAMES="+names)
	}, "sh", append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, snapshotterBin}, e.lazyArgs...)...)
	m.setMain(e.lazy.cmd.Process.Pid)
	e.waitServing()
}

// fuseMounts lists the daemon's FUSE mounts.
func (e *env) fuseMounts() []string {
	ms, err := mountinfo.GetMounts(func(i *mountinfo.Info) (bool, bool) {
		return !strings.HasPrefix(i.Mountpoint, e.lazyRoot+"/") || i.FSType != "fuse.lazylayer", false
	})
	if err != nil {
		e.t.Fatal(err)
	}
	var mps []string
	for _, m := range ms {
		mps = append(mps, m.Mountpoint)
	}
	return mps
}

// holderStarted reports whether a FUSE descriptor holder runs for the
// daemon's root.
func (e *env) holderStarted() bool {
	if _, err := os.Stat(filepath.Join(e.lazyRoot, "fuse-holder.sock.pid")); err == nil {
		return true
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		args := bytes.Split(b, []byte{0})
		if len(args) >= 3 && string(args[1]) == "fuse-holder" && strings.HasPrefix(string(args[2]), e.lazyRoot+"/") {
			return true
		}
	}
	return false
}

// TestRestartFDStore: run as systemd runs it with a file descriptor store,
// the daemon keeps its FUSE connections in the store and starts no holder
// process; ten containers started lazily read files in a loop while it is
// killed with SIGKILL and started again with the stored connections, then
// stopped with SIGTERM and started again: no read fails, every byte is
// right, and files no container read before read right after each restart
// (population held, so they come from the registry through the new
// daemon); once population made the layers local, a file open with FUSE
// passthrough reads on across both restarts.
func TestRestartFDStore(t *testing.T) {
	m := newFDStoreManager(t)
	reg, proxy := startRegistry(t)
	e := newEnv(t, reg.Addr(), proxy.Addr(), manualPopulation)
	e.killHolderOnCleanup()
	m.releaseOnCleanup()
	m.setMain(e.lazy.cmd.Process.Pid)
	data := nativeDataLayer()
	sums := dataSHA256(t, data)
	img := e.convert(push(t, reg.Addr(), "e2e/fdstore:gzip", testimage.Busybox(data)), "e2e/fdstore:estargz")
	if out, err := e.pull("lazylayer", img.ref); err != nil {
		t.Fatalf("pull: %v\n%s", err, out)
	}
	tools := e.nativeTools()
	ids := e.readers(img, tools, sums, 10)
	e.checkNative(img, layerstatus.StateLazy)
	mounts := e.fuseMounts()
	if len(mounts) == 0 {
		t.Fatal("no lazy FUSE mount")
	}
	waitFor(t, "every FUSE connection in the file descriptor store", func() bool { return len(m.missing(mounts)) == 0 })

	steps := []struct {
		sig   syscall.Signal
		fresh []string
	}{
		{syscall.SIGKILL, dataFiles(20, 27)},
		{syscall.SIGTERM, dataFiles(27, 34)},
	}
	for _, s := range steps {
		what := fmt.Sprintf("after %v and a start with the stored connections", s.sig)
		before := e.rounds(ids)
		resumed := e.resumedMounts()
		e.stopLazylayer(s.sig)
		if miss := m.missing(mounts); len(miss) > 0 {
			t.Fatalf("%v: the store lacks the FUSE connections of %v", s.sig, miss)
		}
		e.startLazylayerFromStore(m)
		waitFor(t, "the stored FUSE connections served again", func() bool { return e.resumedMounts()-resumed >= len(mounts) })
		e.checkReaders(what, ids, before)
		e.readFresh(what, ids[len(ids)-1], sums, s.fresh...)
		e.checkNative(img, layerstatus.StateLazy)
		m.check(what)
		if miss := m.missing(mounts); len(miss) > 0 {
			t.Errorf("%s: the store lacks the FUSE connections of %v", what, miss)
		}
	}

	// What the store's records keep besides the descriptors: once local,
	// a file reader0 opened while lazy gets passthrough opens, whose
	// backing id is recorded with the connection; it reads on across a
	// SIGKILL and a SIGTERM.
	e.populate()
	e.checkNative(img, layerstatus.StateLocal)
	f00 := "/data/f00=" + sums["/data/f00"]
	e.ctr("task", "exec", "-d", "--exec-id", "passthrough", ids[0], nativeToolsDir+"/walker", "loop", "/tmp/pt.log", "fd:"+f00, "open:"+f00)
	pt := waitRounds(t, ids[0], "/tmp/pt.log", 2, time.Minute)
	for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
		resumed := e.resumedMounts()
		e.stopLazylayer(sig)
		e.startLazylayerFromStore(m)
		waitFor(t, "the stored FUSE connections served again", func() bool { return e.resumedMounts()-resumed >= len(mounts) })
		l := waitRounds(t, ids[0], "/tmp/pt.log", pt.rounds+3, 2*time.Minute)
		if len(l.errors) > 0 {
			t.Errorf("a file bound to FUSE, opened with passthrough before and after %v: %d reads failed: %v", sig, len(l.errors), l.errors)
		}
		pt = l
	}
	e.checkReaders("after restarts of local layers", ids, e.rounds(ids))
	m.check("after restarts of local layers")
	if e.holderStarted() {
		t.Error("a FUSE descriptor holder was started although systemd's store keeps the connections")
	}
}
