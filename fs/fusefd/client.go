package fusefd

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Held is a connection a Holder kept, as a new daemon takes it back.
type Held struct {
	Conn  Conn
	Note  []byte // what the layer recorded with it
	State []byte // what its server last recorded (SetState)
}

// Client talks to a Holder. Its methods are safe for concurrent use.
type Client struct {
	// passed are the connections the Holder had when the Client
	// connected, until Take claims them; its mu also guards sock.
	passed
	sock int // guarded by mu
}

// StartHolder connects to the Holder listening at path, starting one with
// cmd (a command that runs RunHolder(path)) if none answers, and takes the
// list of connections it holds.
func StartHolder(path string, cmd *exec.Cmd) (*Client, error) {
	sock, err := dial(path)
	if err != nil {
		cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, nil, nil
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("start FUSE descriptor holder: %w", err)
		}
		go cmd.Wait() // reaped if it ends while this daemon runs
		deadline := time.Now().Add(10 * time.Second)
		for {
			if sock, err = dial(path); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("FUSE descriptor holder does not answer at %s: %w", path, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	c := &Client{sock: sock, passed: passed{held: map[string]Held{}}}
	if err := c.list(); err != nil {
		unix.Close(sock)
		return nil, err
	}
	return c, nil
}

// Connect connects to a Holder already listening at path, and takes the
// list of connections it holds.
func Connect(path string) (*Client, error) {
	sock, err := dial(path)
	if err != nil {
		return nil, err
	}
	c := &Client{sock: sock, passed: passed{held: map[string]Held{}}}
	if err := c.list(); err != nil {
		unix.Close(sock)
		return nil, err
	}
	return c, nil
}

func dial(path string) (int, error) {
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Connect(sock, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(sock)
		return -1, err
	}
	return sock, nil
}

func (c *Client) list() error {
	if err := sendMessage(c.sock, message{Op: "list"}, -1); err != nil {
		return err
	}
	for {
		m, fd, err := recvMessage(c.sock)
		if err != nil {
			return fmt.Errorf("list held FUSE connections: %w", err)
		}
		if m.End {
			return nil
		}
		if m.Entry == nil || fd < 0 {
			if fd >= 0 {
				unix.Close(fd)
			}
			continue
		}
		c.held[m.Entry.Name] = Held{Conn: Conn{Fd: fd, Init: m.Entry.Init}, Note: m.Entry.Note, State: m.Entry.State}
	}
}

// call sends a request and waits for its answer.
func (c *Client) call(m message, fd int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sock < 0 {
		return errors.New("FUSE descriptor holder: closed")
	}
	if err := sendMessage(c.sock, m, fd); err != nil {
		return fmt.Errorf("FUSE descriptor holder: %w", err)
	}
	r, rfd, err := recvMessage(c.sock)
	if rfd >= 0 {
		unix.Close(rfd)
	}
	if err != nil {
		return fmt.Errorf("FUSE descriptor holder: %w", err)
	}
	if r.Err != "" {
		return fmt.Errorf("FUSE descriptor holder: %s", r.Err)
	}
	return nil
}

// Keep gives the Holder a copy of conn, served at mountpoint, with note.
func (c *Client) Keep(mountpoint string, conn *Conn, note []byte) error {
	return c.call(message{Op: "keep", Entry: &heldEntry{Name: mountpoint, Init: conn.Init, Note: note}}, conn.Fd)
}

// SetState records state with the connection kept for mountpoint,
// replacing what was recorded before.
func (c *Client) SetState(mountpoint string, state []byte) error {
	return c.call(message{Op: "state", Entry: &heldEntry{Name: mountpoint, State: state}}, -1)
}

// Drop makes the Holder close its copy of the connection of mountpoint.
func (c *Client) Drop(mountpoint string) error {
	return c.call(message{Op: "drop", Entry: &heldEntry{Name: mountpoint}}, -1)
}

// Close closes the connection to the Holder (which keeps what it holds)
// and the descriptors nobody took.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeUnclaimed()
	return closeSocket(&c.sock)
}

// PidFile is where a holder started by StartHolder's command may write
// its process id, beside its socket.
func PidFile(socket string) string { return socket + ".pid" }

// WritePid records the running process as the holder of socket.
func WritePid(socket string) error {
	return os.WriteFile(PidFile(socket), []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o600)
}
