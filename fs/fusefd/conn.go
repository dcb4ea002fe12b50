package fusefd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// MaxWrite is the largest read or write request of lazylayer's mounts.
const MaxWrite = 128 << 10

// Kernel protocol numbers (include/uapi/linux/fuse.h).
const (
	opInit       = 26
	notifyResend = 7 // FUSE_NOTIFY_RESEND, kernel 6.9+
	inHeaderSize = 40
)

// Conn is one FUSE connection: the daemon's copy of its /dev/fuse
// descriptor and the INIT request the kernel sent on it.
type Conn struct {
	Fd   int
	Init []byte // nil until the connection is initialised
}

// Close closes the daemon's descriptor of c. The connection lives while
// another copy (a server's, a Holder's) or the mount does.
func (c *Conn) Close() error {
	if c.Fd < 0 {
		return nil
	}
	err := unix.Close(c.Fd)
	c.Fd = -1
	return err
}

// Mount opens /dev/fuse and mounts a read-only FUSE file system of type
// fuse.<name> at mountpoint with it. The connection is not initialised:
// Serve does that.
func Mount(mountpoint, name string) (*Conn, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d,max_read=%d,allow_other,default_permissions",
		fd, os.Geteuid(), os.Getegid(), MaxWrite)
	if err := unix.Mount(name, mountpoint, "fuse."+name, unix.MS_NOSUID|unix.MS_NODEV|unix.MS_RDONLY, data); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mount FUSE at %s: %w", mountpoint, err)
	}
	return &Conn{Fd: fd}, nil
}

// Serve returns a go-fuse server for raw on c, ready for Serve. A new
// connection (no Init yet) gets its INIT request answered by that server;
// a connection an earlier server answered (a handover) has its INIT
// replayed to the new server, whose answer the kernel does not need, and
// the kernel is asked to send again every request the earlier server read
// but did not answer. opts.MaxWrite should be MaxWrite.
//
// go-fuse reads INIT when it is created; it reads it here from one end of
// a socket pair, and the other end of the pair is then replaced, at the
// same descriptor number, by the connection.
func Serve(c *Conn, raw fuse.RawFileSystem, opts fuse.MountOptions) (*fuse.Server, error) {
	resumed := c.Init != nil
	init := c.Init
	if !resumed {
		var err error
		if init, err = readInit(c.Fd); err != nil {
			return nil, err
		}
	}
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	ours, theirs := sp[0], sp[1]
	defer unix.Close(ours)
	if _, err := unix.Write(ours, init); err != nil {
		unix.Close(theirs)
		return nil, fmt.Errorf("replay FUSE INIT: %w", err)
	}
	opts.DirectMount, opts.DirectMountStrict = false, false
	srv, err := fuse.NewServer(raw, fmt.Sprintf("/dev/fd/%d", theirs), &opts)
	if err != nil {
		unix.Close(theirs)
		return nil, fmt.Errorf("FUSE INIT: %w", err)
	}
	reply := make([]byte, 4096)
	n, err := unix.Read(ours, reply)
	if err == nil && !resumed {
		_, err = unix.Write(c.Fd, reply[:n])
	}
	if err == nil {
		err = unix.Dup3(c.Fd, theirs, unix.O_CLOEXEC)
	}
	if err != nil {
		unix.Close(theirs)
		return nil, fmt.Errorf("FUSE INIT: %w", err)
	}
	c.Init = init
	if resumed {
		if err := NotifyResend(c.Fd); err != nil {
			// The server is not serving yet: nothing reads the connection.
			return srv, fmt.Errorf("ask the kernel to resend unanswered requests: %w", err)
		}
	}
	return srv, nil
}

// readInit reads the kernel's first request on fd, which must be INIT.
func readInit(fd int) ([]byte, error) {
	buf := make([]byte, MaxWrite+64<<10)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR || err == unix.ENOENT {
			continue // ENOENT: a request interrupted before it was read
		}
		if err != nil {
			return nil, fmt.Errorf("read FUSE INIT: %w", err)
		}
		if n < inHeaderSize || binary.LittleEndian.Uint32(buf[4:8]) != opInit {
			return nil, errors.New("read FUSE INIT: the kernel's first request is not INIT")
		}
		return buf[:n:n], nil
	}
}

// NotifyResend asks the kernel to queue again the requests a server read
// on the connection fd but never answered: those of a daemon that died or
// stopped while they were in flight (kernel 6.9+; older kernels refuse
// with EINVAL and those requests wait until the connection ends).
func NotifyResend(fd int) error {
	var h [16]byte
	binary.LittleEndian.PutUint32(h[0:4], 16)
	binary.LittleEndian.PutUint32(h[4:8], notifyResend) // error field: the notification code
	_, err := unix.Write(fd, h[:])
	return err
}

// Mounted reports whether a FUSE file system of type fuse.<name> is
// mounted at mountpoint.
func Mounted(mountpoint, name string) bool {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mountpoint))
	if err != nil {
		return false
	}
	for _, m := range ms {
		if m.FSType == "fuse."+name {
			return true
		}
	}
	return false
}

// NoPoll makes the kernel learn at once that the server at mountpoint does
// not support POLL: the Go runtime adds every file it opens to its epoll
// set, and a POLL request the kernel then sends to a server in the same
// process can wait for a thread the runtime holds (go-fuse answers
// ENOSYS for its ".go-fuse-epoll-hack" file; its own mount code does this
// too, but not for a "/dev/fd/N" mountpoint). Once per connection: the
// kernel remembers it for the connection's life.
func NoPoll(mountpoint string) error {
	fd, err := unix.Open(mountpoint+"/.go-fuse-epoll-hack", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	return nil
}
