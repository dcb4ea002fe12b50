package fusefd

import (
	"sync"

	"golang.org/x/sys/unix"
)

// passed are the connections a new daemon was passed at start (by the
// Holder or by the service manager's store), by mountpoint, until Take
// claims them. Client and Store embed it; its mu guards their other
// fields too.
type passed struct {
	mu   sync.Mutex
	held map[string]Held // guarded by mu
}

// Take returns the connection passed for mountpoint, once; the caller owns
// its descriptor.
func (p *passed) Take(mountpoint string) (Held, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	h, ok := p.held[mountpoint]
	delete(p.held, mountpoint)
	return h, ok
}

// Holds reports whether a connection was passed for mountpoint and nobody
// took it yet.
func (p *passed) Holds(mountpoint string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.held[mountpoint]
	return ok
}

// Unclaimed returns the mountpoints of connections passed that nobody
// took.
func (p *passed) Unclaimed() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for mp := range p.held {
		out = append(out, mp)
	}
	return out
}

// closeUnclaimed closes the descriptors nobody took. p.mu is held.
func (p *passed) closeUnclaimed() {
	for mp, h := range p.held {
		h.Conn.Close()
		delete(p.held, mp)
	}
}

// closeSocket closes *sock unless it is closed (-1) and marks it closed.
func closeSocket(sock *int) error {
	if *sock < 0 {
		return nil
	}
	err := unix.Close(*sock)
	*sock = -1
	return err
}
