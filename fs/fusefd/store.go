package fusefd

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// StoreNamePrefix begins the name (FDNAME) of every descriptor a Store
// puts in the service manager's file descriptor store.
const StoreNamePrefix = "lazylayer-"

// StoreName is the name (FDNAME) under which a Store keeps the
// connection served at mountpoint: printable, without ':', at most 255
// bytes, as systemd requires of descriptor names.
func StoreName(mountpoint string) string {
	sum := sha256.Sum256([]byte(mountpoint))
	return StoreNamePrefix + hex.EncodeToString(sum[:16])
}

// NamedFd is a descriptor the service manager passed at start, with its
// name (LISTEN_FDNAMES).
type NamedFd struct {
	Fd   int
	Name string
}

// ListenFds returns the descriptors the service manager passed to this
// process (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES; fds
// from 3), marked close-on-exec, and unsets those variables so that no
// child takes them for its own. It returns none if LISTEN_PID is not this
// process.
func ListenFds() ([]NamedFd, error) {
	defer func() {
		for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
			os.Unsetenv(v)
		}
	}()
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil, nil
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n < 0 {
		return nil, fmt.Errorf("LISTEN_FDS=%q: want a count", os.Getenv("LISTEN_FDS"))
	}
	var names []string
	if s := os.Getenv("LISTEN_FDNAMES"); s != "" {
		names = strings.Split(s, ":")
	}
	fds := make([]NamedFd, n)
	for i := range fds {
		fds[i] = NamedFd{Fd: 3 + i, Name: "unknown"}
		if i < len(names) {
			fds[i].Name = names[i]
		}
		unix.CloseOnExec(fds[i].Fd)
	}
	return fds, nil
}

// Store keeps FUSE connections in systemd's file descriptor store
// (FileDescriptorStoreMax=) instead of a Holder: each connection's
// descriptor goes to the service manager with sd_notify's FDSTORE=1 under
// StoreName(mountpoint) and comes back to the next daemon in LISTEN_FDS;
// what a Holder would keep with it (the INIT request, the layer's note,
// the server's state) is kept in a file per connection in a directory.
// The service manager also closes a stored descriptor on its own once the
// kernel reports POLLERR on it: the connection ended.
//
// Store has the methods of Client that serving layers use; they are safe
// for concurrent use.
type Store struct {
	notify string // the service manager's NOTIFY_SOCKET
	dir    string // one record per kept connection
	sock   int    // unbound datagram socket to send on

	// passed are the connections passed at start, until Take claims
	// them; its mu also guards stored.
	passed
	// stored is the descriptor in the store for each mountpoint, as far
	// as this daemon knows: one it took back, or one it kept; guarded by mu.
	stored map[string]int
}

// OpenStore returns a Store that sends to the service manager at notify
// (the value of NOTIFY_SOCKET) and keeps its records in dir. fds are the
// descriptors passed at start (ListenFds): those a Store named and
// recorded are held for Take; one of its naming without a record is
// removed from the store and closed, and so is a record without a
// descriptor. Descriptors of other names are left to the caller.
func OpenStore(notify, dir string, fds []NamedFd) (*Store, error) {
	if notify == "" {
		return nil, errors.New("file descriptor store: no NOTIFY_SOCKET")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("file descriptor store records: %w", err)
	}
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("file descriptor store: %w", err)
	}
	s := &Store{notify: notify, dir: dir, sock: sock, passed: passed{held: map[string]Held{}}, stored: map[string]int{}}
	passed := map[string]int{}
	for _, f := range fds {
		if !strings.HasPrefix(f.Name, StoreNamePrefix) {
			continue
		}
		if old, ok := passed[f.Name]; ok {
			unix.Close(old) // stored twice: the service manager passes both
		}
		passed[f.Name] = f.Fd
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("file descriptor store records: %w", err)
	}
	for _, de := range ents {
		name := strings.TrimSuffix(de.Name(), ".json")
		e, err := s.read(name)
		fd, ok := passed[name]
		if err != nil || !ok || StoreName(e.Name) != name {
			os.Remove(filepath.Join(dir, de.Name())) // a record without a descriptor, or a torn one
			continue
		}
		delete(passed, name)
		s.held[e.Name] = Held{Conn: Conn{Fd: fd, Init: e.Init}, Note: e.Note, State: e.State}
		s.stored[e.Name] = fd
	}
	for name, fd := range passed {
		s.send("FDSTOREREMOVE=1\nFDNAME="+name, -1)
		unix.Close(fd)
	}
	return s, nil
}

func (s *Store) path(name string) string { return filepath.Join(s.dir, name+".json") }

func (s *Store) read(name string) (heldEntry, error) {
	var e heldEntry
	b, err := os.ReadFile(s.path(name))
	if err == nil {
		err = json.Unmarshal(b, &e)
	}
	return e, err
}

// write replaces the record of e.Name: written aside, then renamed.
func (s *Store) write(e heldEntry) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	p := s.path(StoreName(e.Name))
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// send sends one sd_notify message, with fd (if not -1) attached.
func (s *Store) send(state string, fd int) error {
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	if err := unix.Sendmsg(s.sock, []byte(state), oob, &unix.SockaddrUnix{Name: s.notify}, 0); err != nil {
		return fmt.Errorf("sd_notify %s: %w", strings.ReplaceAll(state, "\n", " "), err)
	}
	return nil
}

// Adopt moves the connections the Holder c keeps, and nobody took, into
// the store (a daemon that ran without the store left them): they are
// held for Take as if passed at start, and the Holder lets them go.
func (s *Store) Adopt(c *Client) error {
	for _, mp := range c.Unclaimed() {
		h, ok := c.Take(mp)
		if !ok {
			continue
		}
		s.mu.Lock()
		_, dup := s.held[mp]
		var err error
		if !dup {
			err = s.write(heldEntry{Name: mp, Init: h.Conn.Init, Note: h.Note, State: h.State})
			if err == nil {
				err = s.send("FDSTORE=1\nFDNAME="+StoreName(mp), h.Conn.Fd)
			}
			if err == nil {
				s.held[mp], s.stored[mp] = h, h.Conn.Fd
			}
		}
		s.mu.Unlock()
		if dup || err != nil {
			h.Conn.Close() // the Holder keeps its copy
			if err != nil {
				return fmt.Errorf("move the FUSE connection of %s into the store: %w", mp, err)
			}
			continue
		}
		if err := c.Drop(mp); err != nil {
			return err
		}
	}
	return nil
}

// Keep records conn's INIT and note for mountpoint and puts a copy of its
// descriptor in the store, replacing any other kept for mountpoint. A
// connection taken back from the store is there already.
func (s *Store) Keep(mountpoint string, conn *Conn, note []byte) error {
	name := StoreName(mountpoint)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.write(heldEntry{Name: mountpoint, Init: conn.Init, Note: note}); err != nil {
		return fmt.Errorf("record FUSE connection of %s: %w", mountpoint, err)
	}
	if fd, ok := s.stored[mountpoint]; ok && fd == conn.Fd {
		return nil
	} else if ok {
		delete(s.stored, mountpoint)
		if err := s.send("FDSTOREREMOVE=1\nFDNAME="+name, -1); err != nil {
			return err
		}
	}
	if err := s.send("FDSTORE=1\nFDNAME="+name, conn.Fd); err != nil {
		return err
	}
	s.stored[mountpoint] = conn.Fd
	return nil
}

// SetState records state with the connection kept for mountpoint,
// replacing what was recorded before.
func (s *Store) SetState(mountpoint string, state []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, err := s.read(StoreName(mountpoint))
	if err != nil {
		return fmt.Errorf("record state of %s: %w", mountpoint, err)
	}
	e.State = state
	return s.write(e)
}

// Drop removes the connection of mountpoint from the store and its record.
func (s *Store) Drop(mountpoint string) error {
	name := StoreName(mountpoint)
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.stored, mountpoint)
	err := s.send("FDSTOREREMOVE=1\nFDNAME="+name, -1)
	if rerr := os.Remove(s.path(name)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	return err
}

// Close closes the descriptors nobody took (the store keeps its copies)
// and the Store's socket.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closeUnclaimed()
	return closeSocket(&s.sock)
}
