package cache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// key is a chunk's sha256 sum: the index holds 32 bytes per chunk rather than
// a 71-byte digest string.
type key [sha256.Size]byte

// parseKey checks that d is a well-formed sha256 digest, which also makes it
// safe to use in a path.
func parseKey(d digest.Digest) (key, error) {
	if err := d.Validate(); err != nil {
		return key{}, fmt.Errorf("chunk digest %q: %w", d, err)
	}
	if d.Algorithm() != digest.SHA256 {
		return key{}, fmt.Errorf("chunk digest %q: %w", d, digest.ErrDigestUnsupported)
	}
	var k key
	if _, err := hex.Decode(k[:], []byte(d.Encoded())); err != nil {
		return key{}, fmt.Errorf("chunk digest %q: %w", d, err)
	}
	return k, nil
}

func (k key) hex() string { return hex.EncodeToString(k[:]) }

func (k key) digest() digest.Digest { return digest.Digest("sha256:" + k.hex()) }

func (k key) String() string { return string(k.digest()) }

// verify returns an error wrapping ErrDigestMismatch unless b hashes to k.
func verify(k key, b []byte) error {
	got := key(sha256.Sum256(b))
	if got != k {
		return fmt.Errorf("chunk %s: %w: the bytes hash to %s", k, ErrDigestMismatch, got)
	}
	return nil
}

const (
	chunksDir  = "sha256"
	stagingDir = "staging"
	lockName   = "lock"
)

func shardName(b byte) string { return hex.EncodeToString([]byte{b}) }

func (s *Store) chunkPath(k key) string {
	h := k.hex()
	return filepath.Join(s.dir, chunksDir, h[:2], h)
}

// errStale says a chunk file does not hold what the index recorded.
var errStale = errors.New("chunk file is missing, damaged or of the wrong size")

// readChunk reads chunk k, which the index says holds size bytes. The error
// wraps errStale when the file is gone, unreadable or of another size.
func (s *Store) readChunk(k key, size int64) ([]byte, error) {
	f, err := os.Open(s.chunkPath(k))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read chunk %s: %w", k, errStale)
	}
	if err != nil {
		return nil, fmt.Errorf("read chunk %s: %w", k, err)
	}
	defer f.Close()
	b := make([]byte, size)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("read chunk %s: %w (%w)", k, errStale, err)
	}
	var extra [1]byte
	if n, err := f.Read(extra[:]); n > 0 || err != io.EOF {
		return nil, fmt.Errorf("read chunk %s: %w: longer than %d bytes", k, errStale, size)
	}
	return b, nil
}

// readChunkAt reads len(p) bytes at off of chunk k, which the index says
// holds size bytes. Like readChunk, the error wraps errStale when the file
// is gone, unreadable or of another size.
func (s *Store) readChunkAt(k key, size int64, p []byte, off int64) error {
	f, err := os.Open(s.chunkPath(k))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("read chunk %s: %w", k, errStale)
	}
	if err != nil {
		return fmt.Errorf("read chunk %s: %w", k, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("read chunk %s: %w", k, err)
	}
	if st.Size() != size {
		return fmt.Errorf("read chunk %s: %w: %d bytes, not %d", k, errStale, st.Size(), size)
	}
	if _, err := f.ReadAt(p, off); err != nil {
		return fmt.Errorf("read chunk %s: %w (%w)", k, errStale, err)
	}
	return nil
}

// stage writes b to a new file in dir/staging and returns its path.
func (s *Store) stage(b []byte) (string, error) {
	f, err := os.CreateTemp(filepath.Join(s.dir, stagingDir), "chunk-")
	if err != nil {
		return "", err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(f.Name()) // Open clears dir/staging if this fails too.
		return "", err
	}
	return f.Name(), nil
}

// lockDir takes an exclusive lock on dir/lock, held until the file is closed.
func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock %s: another store uses the directory: %w", f.Name(), err)
		}
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return f, nil
}

// prepareDirs empties dir/staging and makes sure dir/sha256 exists. Its shard
// directories are made when the first chunk goes into each (see rename).
func (s *Store) prepareDirs() error {
	staging := filepath.Join(s.dir, stagingDir)
	if err := os.RemoveAll(staging); err != nil {
		return err
	}
	if err := os.Mkdir(staging, 0o700); err != nil {
		return err
	}
	return os.MkdirAll(filepath.Join(s.dir, chunksDir), 0o700)
}

// rename moves a staged chunk file into place, making its shard directory if
// needed.
func (s *Store) rename(staged string, k key) error {
	path := s.chunkPath(k)
	err := os.Rename(staged, path)
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.Mkdir(filepath.Dir(path), 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return os.Rename(staged, path)
}

// found is a chunk file that Open indexes.
type found struct {
	key      key
	size     int64
	lastUsed int64 // Unix nanoseconds
}

// scan lists the chunk files under dir/sha256. Files whose names are not a
// sha256 hex digest in the right shard, and anything but regular files, are
// left alone.
func (s *Store) scan(ctx context.Context) ([]found, error) {
	root := filepath.Join(s.dir, chunksDir)
	shards, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	var all []found
	for _, shard := range shards {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if !shard.IsDir() || len(shard.Name()) != 2 {
			continue
		}
		entries, err := os.ReadDir(filepath.Join(root, shard.Name()))
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			k, ok := keyFromName(e.Name())
			if !ok || shardName(k[0]) != shard.Name() || !e.Type().IsRegular() {
				continue
			}
			info, err := e.Info()
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, err
			}
			all = append(all, found{key: k, size: info.Size(), lastUsed: lastUsed(info)})
		}
	}
	return all, nil
}

// keyFromName parses a chunk file name: 64 lowercase hex digits.
func keyFromName(name string) (key, bool) {
	var k key
	if len(name) != 2*len(k) {
		return key{}, false
	}
	if _, err := hex.Decode(k[:], []byte(name)); err != nil || k.hex() != name {
		return key{}, false
	}
	return k, true
}

// lastUsed estimates when a chunk file was last read: its access time, which
// Linux's default relatime updates at most once a day, or its modification
// time if that is later (as it is on noatime mounts).
func lastUsed(info fs.FileInfo) int64 {
	t := info.ModTime().UnixNano()
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		if a := st.Atim.Nano(); a > t {
			t = a
		}
	}
	return t
}
