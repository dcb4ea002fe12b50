package fusefd

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A held connection, as the Holder and its clients exchange it.
type heldEntry struct {
	Name  string `json:"name"`            // the mountpoint
	Init  []byte `json:"init,omitempty"`  // the kernel's INIT request
	Note  []byte `json:"note,omitempty"`  // the layer's own record (what it serves)
	State []byte `json:"state,omitempty"` // the server's state, as it last recorded it
}

// message is one request or answer on a Holder's socket. An answer to
// "list" is one message per entry, each with its descriptor, then one
// with End set.
type message struct {
	Op    string     `json:"op,omitempty"` // keep, state, drop, list
	Entry *heldEntry `json:"entry,omitempty"`
	Err   string     `json:"err,omitempty"`
	End   bool       `json:"end,omitempty"`
}

const maxMessage = 1 << 20

// MaxState is the most state (Client.SetState) a Holder keeps with a
// connection.
const MaxState = maxMessage - 64<<10

// RunHolder listens on the unix socket path and holds the descriptors its
// clients give it until they drop them. It returns once it holds none and
// no client is connected (or, at start, none connected within a minute).
// Only clients of the holder's own user may connect.
func RunHolder(path string) error {
	os.Remove(path)
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	old := unix.Umask(0o077)
	err = unix.Bind(lfd, &unix.SockaddrUnix{Name: path})
	unix.Umask(old)
	if err == nil {
		err = unix.Listen(lfd, 8)
	}
	if err != nil {
		unix.Close(lfd)
		return fmt.Errorf("holder socket %s: %w", path, err)
	}
	h := &holder{entries: map[string]held{}, lfd: lfd, stopped: make(chan struct{})}
	h.idle = time.AfterFunc(time.Minute, h.stopIfIdle)
	reaped := make(chan struct{})
	go func() {
		defer close(reaped)
		h.reap()
	}()
	for {
		cfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		if err != nil {
			h.mu.Lock()
			done := h.done
			h.mu.Unlock()
			if done {
				<-reaped // nothing of the holder outlives it
				return nil
			}
			if err == unix.EINTR || err == unix.ECONNABORTED {
				continue
			}
			return err
		}
		cred, err := unix.GetsockoptUcred(cfd, unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil || int(cred.Uid) != os.Geteuid() {
			unix.Close(cfd)
			continue
		}
		h.mu.Lock()
		h.clients++
		h.mu.Unlock()
		go h.serve(cfd)
	}
}

type held struct {
	entry heldEntry
	fd    int
}

type holder struct {
	lfd     int
	idle    *time.Timer
	stopped chan struct{} // closed when done is set

	mu      sync.Mutex
	entries map[string]held // by mountpoint; guarded by mu
	clients int             // connected clients; guarded by mu
	done    bool            // the listener is closed; guarded by mu
}

func (h *holder) stopIfIdle() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.clients == 0 && len(h.entries) == 0 && !h.done {
		h.done = true
		close(h.stopped)
		unix.Shutdown(h.lfd, unix.SHUT_RDWR)
		unix.Close(h.lfd)
	}
}

// reap closes the descriptors of connections that ended (their mount and
// every overlay using it are gone, or they were aborted): the kernel then
// reports POLLERR on them. It checks once a second.
func (h *holder) reap() {
	for {
		h.mu.Lock()
		if h.done {
			h.mu.Unlock()
			return
		}
		var fds []unix.PollFd
		var names []string
		for name, e := range h.entries {
			fds = append(fds, unix.PollFd{Fd: int32(e.fd)})
			names = append(names, name)
		}
		h.mu.Unlock()
		if len(fds) == 0 {
			h.pause(time.Second)
			continue
		}
		if _, err := unix.Poll(fds, 1000); err != nil && err != unix.EINTR {
			h.pause(time.Second)
			continue
		}
		ended := false
		h.mu.Lock()
		for i, pfd := range fds {
			if pfd.Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) == 0 {
				continue
			}
			if e, ok := h.entries[names[i]]; ok && e.fd == int(pfd.Fd) {
				unix.Close(e.fd)
				delete(h.entries, names[i])
				ended = true
			}
		}
		h.mu.Unlock()
		if ended {
			h.stopIfIdle()
		} else {
			h.pause(100 * time.Millisecond)
		}
	}
}

// pause waits d, or less if the holder stops meanwhile.
func (h *holder) pause(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-h.stopped:
	}
}

func (h *holder) serve(cfd int) {
	defer func() {
		unix.Close(cfd)
		h.mu.Lock()
		h.clients--
		h.mu.Unlock()
		h.stopIfIdle()
	}()
	for {
		m, fd, err := recvMessage(cfd)
		if err != nil {
			return
		}
		var reply message
		switch m.Op {
		case "keep":
			if m.Entry == nil || fd < 0 {
				reply.Err = "keep: no entry or no descriptor"
				break
			}
			h.mu.Lock()
			if old, ok := h.entries[m.Entry.Name]; ok {
				unix.Close(old.fd)
			}
			h.entries[m.Entry.Name] = held{entry: *m.Entry, fd: fd}
			h.mu.Unlock()
			fd = -1
		case "state":
			h.mu.Lock()
			if m.Entry != nil {
				if e, ok := h.entries[m.Entry.Name]; ok {
					e.entry.State = m.Entry.State
					h.entries[m.Entry.Name] = e
				}
			}
			h.mu.Unlock()
		case "drop":
			h.mu.Lock()
			if m.Entry != nil {
				if old, ok := h.entries[m.Entry.Name]; ok {
					unix.Close(old.fd)
					delete(h.entries, m.Entry.Name)
				}
			}
			h.mu.Unlock()
		case "list":
			h.mu.Lock()
			var list []held
			for _, e := range h.entries {
				list = append(list, e)
			}
			h.mu.Unlock()
			for _, e := range list {
				if err := sendMessage(cfd, message{Entry: &e.entry}, e.fd); err != nil {
					return
				}
			}
			reply.End = true
		default:
			reply.Err = "unknown operation " + m.Op
		}
		if fd >= 0 {
			unix.Close(fd)
		}
		if err := sendMessage(cfd, reply, -1); err != nil {
			return
		}
	}
}

func sendMessage(sock int, m message, fd int) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	return unix.Sendmsg(sock, b, oob, nil, 0)
}

// recvMessage reads one message and the descriptor that came with it (-1
// if none).
func recvMessage(sock int) (message, int, error) {
	var m message
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		n, oobn, flags, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return m, -1, err
		}
		if n == 0 {
			return m, -1, errors.New("connection closed")
		}
		fd := -1
		if oobn > 0 {
			scms, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err == nil {
				for _, scm := range scms {
					fds, err := unix.ParseUnixRights(&scm)
					if err != nil {
						continue
					}
					for _, f := range fds {
						if fd < 0 {
							fd = f
						} else {
							unix.Close(f)
						}
					}
				}
			}
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			if fd >= 0 {
				unix.Close(fd)
			}
			return m, -1, errors.New("message truncated")
		}
		if err := json.Unmarshal(buf[:n], &m); err != nil {
			if fd >= 0 {
				unix.Close(fd)
			}
			return m, -1, fmt.Errorf("bad message: %w", err)
		}
		return m, fd, nil
	}
}
